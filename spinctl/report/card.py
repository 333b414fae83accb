"""`--card`: the report's summary as a section of the patched model's README.md, between markers.

The section is appended to the README as it was before the first `--card` (or makes a new
README); a rerun replaces it. The edit goes through io/nonweight_edits, so the manifest
records it: verify checks the README's sha256 and revert restores the original README.

`check` runs before the report writes anything; `write` runs inside the report's staging,
so a card that cannot be written leaves no new report, and `undo` puts the manifest and the
README back as `snapshot` found them when a later step fails.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from spinctl.errors import InputError, OutputError
from spinctl.io import nonweight_edits
from spinctl.io.files import atomic_write_bytes
from spinctl.io.lock import ModelLock
from spinctl.io.sidecars import read_manifest, sidecar_paths

README = "README.md"
BEGIN = "<!-- spinctl report: begin (written by `spinctl report --card`; a rerun replaces this section) -->"
END = "<!-- spinctl report: end -->"


def section(original: bytes, markdown: str) -> bytes:
    """What follows the original README: a blank line, the markers and the summary."""
    sep = "" if not original else "\n" if original.endswith(b"\n") else "\n\n"
    return f"{sep}{BEGIN}\n\n{markdown.rstrip()}\n\n{END}\n".encode()


def check(patched: Path) -> None:
    """Before the report writes anything: the card can be written (a patched directory we may write in,
    its manifest a regular file, its README a regular file or absent, and unedited in its original part)."""
    patched = Path(patched)
    if not patched.is_dir():
        raise InputError(f"{patched}: --card needs a patched model directory (a lone weight file has no README.md)")
    manifest_path = sidecar_paths(patched)[0]
    readme = patched / README
    _regular_or_absent(manifest_path, absent_ok=False)
    _regular_or_absent(readme, absent_ok=True)
    if not os.access(patched, os.W_OK | os.X_OK):  # both files are replaced by a rename in the directory
        raise OutputError(
            f"{patched}: not writable; --card writes README.md there and records it in {manifest_path.name}"
        )
    rec = nonweight_edits.records(read_manifest(manifest_path), manifest_path).get(README)
    if rec is not None:
        nonweight_edits.original(readme, rec)


def _regular_or_absent(path: Path, absent_ok: bool) -> None:
    try:
        st = os.stat(path)  # through a symlink: README.md may be one (a Hub snapshot's files are)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise InputError(f"{path}: a symlink to nothing; remove it or point it at a file") from None
        if absent_ok:
            return
        raise InputError(f"{path}: no manifest; this is not a checkpoint patched by spinctl") from None
    if not stat.S_ISREG(st.st_mode):
        what = "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise InputError(f"{path}: {what}; --card needs {path.name} to be a file, or absent")


@dataclass(frozen=True)
class Snapshot:
    """The manifest's bytes and the README as it was (bytes, a symlink's target, or absent)."""

    manifest: bytes
    readme: bytes | None
    readme_link: str | None


def snapshot(patched: Path) -> Snapshot:
    patched = Path(patched)
    readme = patched / README
    link = os.readlink(readme) if readme.is_symlink() else None
    return Snapshot(
        sidecar_paths(patched)[0].read_bytes(), readme.read_bytes() if link is None and readme.exists() else None, link
    )


def undo(patched: Path, saved: Snapshot) -> None:
    """Put the manifest and README.md back as `saved` (after a failure; the original error is what is shown)."""
    patched = Path(patched)
    manifest_path, readme = sidecar_paths(patched)[0], patched / README
    with ModelLock(patched, exclusive=True):  # busy: another spinctl got in first, and its files are its own
        if manifest_path.read_bytes() != saved.manifest:
            atomic_write_bytes(manifest_path, saved.manifest)
        if saved.readme_link is not None:
            if not (readme.is_symlink() and os.readlink(readme) == saved.readme_link):
                tmp = patched / f".{README}.undo.tmp"
                tmp.unlink(missing_ok=True)
                os.symlink(saved.readme_link, tmp)
                os.replace(tmp, readme)
        elif saved.readme is None:
            if os.path.lexists(readme):
                readme.unlink()
        elif readme.is_symlink() or not readme.is_file() or readme.read_bytes() != saved.readme:
            atomic_write_bytes(readme, saved.readme)


def write(patched: Path, markdown: str, saved: Snapshot | None = None) -> dict:
    """Write the section; returns the manifest's record of README.md. On failure the manifest and
    README are put back as `saved` (by default, as they are now)."""
    saved = saved or snapshot(patched)
    started = []

    def tail(original: bytes) -> bytes:
        started.append(True)  # under the model lock, before the manifest is written: from here on, undo
        return section(original, markdown)

    try:
        return nonweight_edits.append_recorded(Path(patched), README, tail)
    except BaseException:
        if started:  # else nothing was written (the lock was busy, the README edited by hand)
            with contextlib.suppress(Exception):  # the first failure is the one to report
                undo(patched, saved)
        raise
