"""Non-weight files spinctl edits in a patched model (the README's report section), recorded in its manifest.

An edit only ever appends to the file as it was before spinctl's first edit. The manifest's
`other_files` entry for it keeps that original's size and sha256 (`input_sha256` None: there
was no such file) and the sha256 after the edit (`output_sha256`). `verify` checks the
latter; `revert` cuts the file back to its original size (or removes it), after checking the
kept bytes against `input_sha256`. A second edit replaces what the first appended.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from spinctl.errors import InputError
from spinctl.io.checkpoint import WEIGHT_SUFFIXES
from spinctl.io.files import atomic_write_bytes, file_sha256
from spinctl.io.lock import ModelLock
from spinctl.io.sidecars import read_manifest, sidecar_paths, write_manifest

KEY = "other_files"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def records(manifest: dict, manifest_path: Path) -> dict[str, dict]:
    """The manifest's `other_files`, validated: plain non-weight names, well-formed entries ({} when absent)."""
    found = manifest.get(KEY, {})
    if not isinstance(found, dict):
        raise InputError(f"{manifest_path}: {KEY} is not an object; the manifest is corrupt")
    for rel, rec in found.items():
        bad_name = (
            "/" in rel
            or rel in ("", ".", "..")
            or rel.startswith((".", "spin-"))
            or Path(rel).suffix in WEIGHT_SUFFIXES
        )
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("input_sha256"), (str, type(None)))
            and isinstance(rec.get("input_size"), int)
            and rec["input_size"] >= 0
            and isinstance(rec.get("output_sha256"), str)
        )
        if bad_name or not ok:
            raise InputError(f"{manifest_path}: entry {rel!r} of {KEY} is malformed; the manifest is corrupt")
    return found


def original(path: Path, rec: dict) -> bytes | None:
    """The file as it was before spinctl edited it (None: it did not exist), checked against the record."""
    if rec["input_sha256"] is None:
        return None
    try:
        head = path.read_bytes()[: rec["input_size"]]
    except FileNotFoundError:
        head = b""
    if len(head) != rec["input_size"] or _sha(head) != rec["input_sha256"]:
        raise InputError(
            f"{path}: its first {rec['input_size']} bytes are no longer the original the manifest recorded "
            "(the file was edited after spinctl added to it); restore them, or copy the file back from the original model"
        )
    return head


def append_recorded(target: Path, rel: str, tail: Callable[[bytes], bytes]) -> dict:
    """Make TARGET/rel its original bytes followed by tail(original), and record that in the manifest.

    The manifest is written first: a crash before the file is written leaves `verify`
    failing on that file, and rerunning the edit (or a revert) repairs it. Returns the record.
    """
    target = Path(target)
    if not target.is_dir():
        raise InputError(f"{target}: not a patched model directory; a lone weight file has no {rel} to edit")
    manifest_path = sidecar_paths(target)[0]
    with ModelLock(target, exclusive=True):
        manifest = read_manifest(manifest_path)
        path = target / rel
        rec = records(manifest, manifest_path).get(rel)
        if rec is not None:
            before = original(path, rec)
        else:
            before = path.read_bytes() if path.is_file() else None
        new = (before or b"") + tail(before or b"")
        rec = {
            "input_sha256": None if before is None else _sha(before),
            "input_size": len(before or b""),
            "output_sha256": _sha(new),
        }
        manifest[KEY] = {**manifest.get(KEY, {}), rel: rec}
        write_manifest(manifest_path, manifest)
        atomic_write_bytes(path, new)
    return rec


def mismatches(root: Path, manifest: dict, manifest_path: Path) -> list[str]:
    """Recorded files that are missing or differ from their `output_sha256` (for verify)."""
    return [
        rel
        for rel, rec in records(manifest, manifest_path).items()
        if not (root / rel).is_file() or file_sha256(root / rel) != rec["output_sha256"]
    ]


def check_restorable(root: Path, manifest: dict | None, manifest_path: Path) -> None:
    """Before a revert writes anything: each recorded file still starts with its original bytes."""
    for rel, rec in records(manifest or {}, manifest_path).items():
        original(root / rel, rec)


def restore(src: Path, dst: Path, manifest: dict | None, manifest_path: Path) -> None:
    """Write each recorded file's original into `dst` (remove it where there was none); src may be dst."""
    for rel, rec in records(manifest or {}, manifest_path).items():
        before = original(src / rel, rec)
        if before is None:
            (dst / rel).unlink(missing_ok=True)
        else:
            atomic_write_bytes(dst / rel, before)
