"""The files a patch leaves beside the weights: spin-manifest.json and the spin-undo.safetensors log."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl import __version__
from spinctl.errors import InputError
from spinctl.io import untrusted
from spinctl.io.checkpoint import ITEMSIZE, TensorEntry, read_shard
from spinctl.io.files import atomic_write_bytes, file_sha256

MANIFEST = "spin-manifest.json"
UNDO = "spin-undo.safetensors"


def sidecar_paths(target: Path) -> tuple[Path, Path]:
    """(manifest, undo) for a patched directory, or NAME.spin-* beside a single patched file."""
    target = Path(target)
    if target.is_file():
        return target.with_name(f"{target.name}.{MANIFEST}"), target.with_name(f"{target.name}.{UNDO}")
    return target / MANIFEST, target / UNDO


def is_sidecar(name: str) -> bool:
    """An undo log or manifest of any target: spin-undo*/spin-manifest*, or NAME.spin-undo*/NAME.spin-manifest*."""
    return not name.startswith(".") and ("spin-undo" in name or "spin-manifest" in name)


def refuse_stacked(target: Path, in_place: bool) -> None:
    """Undo logs never stack: a second patch over a patched model would log patched bytes as the originals.

    A directory: any undo log or manifest at its top. A lone file: its own NAME.spin-*, or its
    directory's spin-* (the file is a shard of a model patched as a directory). In place, the
    target's own pair is left to the caller, which resumes an interrupted patch or refuses.
    """
    target = Path(target)
    own = set(sidecar_paths(target)) if in_place else set()
    if target.is_dir():
        found = [p for p in sorted(target.iterdir()) if is_sidecar(p.name)]
    else:
        found = [p for p in (*sidecar_paths(target), *sidecar_paths(target.parent)) if p.exists()]
    found = sorted((p for p in found if p not in own), key=lambda p: "spin-undo" not in p.name)  # name the log first
    if found:
        raise InputError(
            f"{found[0]}: {target} carries an undo log or manifest of an earlier patch; revert that patch "
            "first (spinctl revert --in-place), or patch the original: a second patch on top would lose the "
            "original bytes"
        )


def remove_stale_temps(target: Path) -> None:
    """A process killed between writing and renaming its undo log or manifest leaves `.NAME.*.tmp`: called under the
    exclusive lock, so no live writer owns them."""
    for p in sidecar_paths(target):
        for stale in p.parent.glob(f".{p.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())


def read_manifest(path: Path) -> dict:
    data = untrusted.read_json(path, "no manifest; this is not a checkpoint patched by spinctl", "manifest is ")
    if not isinstance(data, dict) or data.get("tool") != "spinctl" or not isinstance(data.get("files"), dict):
        raise InputError(f"{path}: not a spinctl manifest")
    bad = next((k for k, v in data["files"].items() if not isinstance(v, dict)), None)
    if bad is not None:
        raise InputError(f"{path}: entry for {bad!r} in files is not an object; the manifest is corrupt")
    # The fields that verify and revert trust, when present (older manifests lack some), must
    # have the types patch writes: a null `tensors` or `undo_sha256` would skip their checks.
    wrong = next((k for k, ok in _MANIFEST_TYPES.items() if k in data and not ok(data[k])), None)
    wrong = wrong or next(
        (
            f"files.{f}.{k}"
            for f, e in data["files"].items()
            for k, ok in _FILE_TYPES.items()
            if k in e and not ok(e[k])
        ),
        None,
    )
    if wrong is not None:
        raise InputError(f"{path}: {wrong} is not what spinctl patch writes; the manifest is corrupt")
    return data


def _sha256_text(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _count(v) -> bool:
    return type(v) is int and v >= 0


_MANIFEST_TYPES = {
    "hashes": lambda v: type(v) is bool,
    "tensors": lambda v: isinstance(v, dict) and all(_count(n) for n in v.values()),
    "undo_sha256": _sha256_text,
    "fingerprint": lambda v: isinstance(v, str),
}
_FILE_TYPES = {
    "zeroed": _count,
    "changed": lambda v: type(v) is bool,
    "input_sha256": _sha256_text,
    "output_sha256": _sha256_text,
}


@dataclass(frozen=True)
class UndoEntry:
    """The original raw bytes of the zeroed elements of one tensor."""

    dtype: str
    indices: np.ndarray  # int64 [k], sorted
    values: bytes  # k * itemsize raw bytes, in index order


def encode_undo(entries: dict[str, UndoEntry], fingerprint: str) -> bytes:
    """A safetensors file written by hand: numpy has no bfloat16, and the values stay raw bytes."""
    header: dict = {
        "__metadata__": {
            "spinctl": json.dumps(
                {"format": 1, "kind": "undo", "fingerprint": fingerprint, "version": __version__}, separators=(",", ":")
            )
        }
    }
    blobs, offset = [], 0
    for name in sorted(entries):
        e = entries[name]
        for key, dtype, data in (
            (f"indices/{name}", "I64", np.ascontiguousarray(e.indices, dtype="<i8").tobytes()),
            (f"values/{name}", e.dtype, e.values),
        ):
            header[key] = {
                "dtype": dtype,
                "shape": [len(data) // ITEMSIZE[dtype]],
                "data_offsets": [offset, offset + len(data)],
            }
            blobs.append(data)
            offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors writers do
    return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)


def write_undo(path: Path, entries: dict[str, UndoEntry], fingerprint: str) -> str:
    """Write the log; returns its sha256, which the manifest records so a changed log is caught before a revert."""
    data = encode_undo(entries, fingerprint)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def check_undo_recorded(undo_path: Path, undo: dict[str, UndoEntry], manifest: dict) -> None:
    """The undo log is the one the manifest recorded: same sha256, same tensors with the same counts.

    Older manifests lack `undo_sha256`; the per-tensor counts are checked whatever the version.
    """
    want = manifest.get("undo_sha256")
    if want is not None and file_sha256(undo_path) != want:
        raise InputError(
            f"{undo_path}: sha256 differs from the one recorded in the manifest; the undo log was changed "
            "or is corrupt, and restoring from it would not give the original bytes"
        )
    counts = manifest.get("tensors")
    if isinstance(counts, dict) and counts != {n: len(e.indices) for n, e in undo.items()}:
        extra = sorted(set(undo) - set(counts)) or sorted(
            n for n in counts if n in undo and counts[n] != len(undo[n].indices)
        )
        missing = sorted(set(counts) - set(undo))
        what = (
            f"tensor {missing[0]} is missing from it"
            if missing
            else f"tensor {extra[0]} is not as the manifest recorded"
        )
        raise InputError(f"{undo_path}: {what}; the undo log was changed or is corrupt")


def read_undo(path: Path) -> tuple[str, dict[str, UndoEntry]]:
    """(fingerprint, entries), validated: every tensor has indices and values of matching length."""
    shard = read_shard(path)
    try:
        meta = untrusted.loads((shard.metadata or {})["spinctl"])
        assert meta["kind"] == "undo"
    except (KeyError, ValueError, AssertionError, TypeError):
        raise InputError(f"{path}: not a spinctl undo log") from None
    names = {k.partition("/")[2] for k in shard.tensors}
    entries = {}
    with open(path, "rb") as f:
        for name in sorted(names):
            ti, tv = shard.tensors.get(f"indices/{name}"), shard.tensors.get(f"values/{name}")
            if ti is None or tv is None or ti.dtype != "I64" or math.prod(ti.shape) != math.prod(tv.shape):
                raise InputError(f"{path}: tensor {name} lacks matching indices and values")
            f.seek(ti.begin)
            idx = np.frombuffer(f.read(ti.end - ti.begin), dtype="<i8").astype(np.int64)
            if len(idx) and (idx[0] < 0 or np.any(idx[1:] <= idx[:-1])):
                raise InputError(
                    f"{path}: tensor {name}: indices are not sorted, unique and non-negative; the undo log is corrupt"
                )
            f.seek(tv.begin)
            entries[name] = UndoEntry(tv.dtype, idx, f.read(tv.end - tv.begin))
    return meta.get("fingerprint", ""), entries


def check_undo(path: Path, entries: dict[str, UndoEntry], tensors: dict[str, TensorEntry]) -> None:
    """Before any byte is restored: every entry names a tensor of the model, with its dtype, inside its elements."""
    for name, e in sorted(entries.items()):
        t = tensors.get(name)
        if t is None:
            raise InputError(f"{path}: tensor {name} is in no weight file of the model")
        if e.dtype != t.dtype or (len(e.indices) and e.indices[-1] >= t.numel):
            raise InputError(
                f"{path}: tensor {name}: the undo log holds {e.dtype} values up to index "
                f"{int(e.indices[-1]) if len(e.indices) else -1}, but {t.file.name} has {t.dtype} {list(t.shape)}; the undo log is corrupt"
            )
