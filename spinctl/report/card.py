"""`--card`: the report's summary as a section of the patched model's README.md, between markers.

The section is appended to the README as it was before the first `--card` (or makes a new
README); a rerun replaces it. The edit goes through io/nonweight_edits, so the manifest
records it: verify checks the README's sha256 and revert restores the original README.
"""

from __future__ import annotations

from pathlib import Path

from spinctl.errors import InputError
from spinctl.io import nonweight_edits
from spinctl.io.sidecars import read_manifest, sidecar_paths

README = "README.md"
BEGIN = "<!-- spinctl report: begin (written by `spinctl report --card`; a rerun replaces this section) -->"
END = "<!-- spinctl report: end -->"


def section(original: bytes, markdown: str) -> bytes:
    """What follows the original README: a blank line, the markers and the summary."""
    sep = "" if not original else "\n" if original.endswith(b"\n") else "\n\n"
    return f"{sep}{BEGIN}\n\n{markdown.rstrip()}\n\n{END}\n".encode()


def check(patched: Path) -> None:
    """Before the report writes anything: the card can be written (a patched directory, its README unedited)."""
    patched = Path(patched)
    if not patched.is_dir():
        raise InputError(f"{patched}: --card needs a patched model directory (a lone weight file has no README.md)")
    manifest_path = sidecar_paths(patched)[0]
    rec = nonweight_edits.records(read_manifest(manifest_path), manifest_path).get(README)
    if rec is not None:
        nonweight_edits.original(patched / README, rec)


def write(patched: Path, markdown: str) -> dict:
    """Write the section; returns the manifest's record of README.md."""
    return nonweight_edits.append_recorded(Path(patched), README, lambda original: section(original, markdown))
