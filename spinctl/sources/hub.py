"""Model arguments: a local directory or file, or a Hugging Face Hub id resolved offline from the local cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from spinctl.errors import InputError

# org/name[@revision]: what `from_pretrained` takes; a bare name is left to mean a relative path.
HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+))?")


def resolve_model(spec: str | Path) -> Path:
    """An existing path as it is; else `org/name[@rev]` -> its snapshot directory in the HF cache.

    Resolution is transformers' own with `local_files_only` (refs/REV -> snapshots/COMMIT, or a
    commit hash directly), so no network is touched. Anything else comes back as a path for the
    caller to report as missing.

    `~user/...` for an unknown user stays as written, as a shell leaves it (Path.expanduser
    would raise instead), and is reported as missing like any other path.
    """
    path = Path(os.path.expanduser(str(spec)))
    if path.exists():
        return path
    m = HUB_ID.fullmatch(str(spec))
    if m is None:
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, rev = m.group("repo"), m.group("rev")
    try:
        return Path(snapshot_download(repo, revision=rev, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        revision = f" at revision {rev}" if rev else ""
        raise InputError(
            f"{spec}: no such directory, and {repo}{revision} is not in the Hugging Face cache "
            f"(looked in {where}); download it first or give a local directory"
        ) from None
