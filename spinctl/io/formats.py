"""Score and selection files (docs/design.md §5): write atomically, read and validate; never unpickle."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl import __version__
from spinctl.errors import InputError, OutputError
from spinctl.io import untrusted
from spinctl.io.checkpoint import read_shard
from spinctl.io.files import atomic_write_bytes

FORMAT = 1
SCORE_KEYS = (
    "format",
    "kind",
    "method",
    "nsamples",
    "seed",
    "keep",
    "targets",
    "max_length",
    "dtype",
    "dataset_sha256",
    "dataset_rows",
    "fingerprint",
    "shapes",
    "version",
)
SELECTION_KEYS = (
    "format",
    "kind",
    "mode",
    "p",
    "q",
    "retain_sha256",
    "couple_sha256",
    "fingerprint",
    "shapes",
    "version",
)


def top_count(fraction: float, n: int) -> int:
    """k = floor(f · n) for a top set (docs/design.md §3); the epsilon absorbs 5e-7·n float noise."""
    return int(math.floor(fraction * n + 1e-9))


def keep_count(keep: float, n: int) -> int:
    """K = ceil(keep · n) entries stored per tensor in a score file (docs/design.md §5)."""
    return int(math.ceil(keep * n - 1e-9))


@dataclass(frozen=True)
class ScoreFile:
    """Top-K (index, score) pairs per tensor, ranked by score desc then index asc."""

    path: Path
    meta: dict
    indices: dict[str, np.ndarray]  # name -> int64 [K]
    scores: dict[str, np.ndarray]  # name -> float32 [K]

    @property
    def shapes(self) -> dict[str, list[int]]:
        return self.meta["shapes"]

    @property
    def keep(self) -> float:
        return float(self.meta["keep"])


@dataclass(frozen=True)
class SelectionFile:
    """Sorted flat indices to zero, per tensor."""

    path: Path
    meta: dict
    indices: dict[str, np.ndarray]  # name -> int64 sorted ascending

    @property
    def shapes(self) -> dict[str, list[int]]:
        return self.meta["shapes"]


def _save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    from safetensors.numpy import save

    data = save(arrays, metadata={"spinctl": json.dumps(meta, separators=(",", ":"))})
    atomic_write_bytes(Path(path), data)


def score_meta(**fields) -> dict:
    """The score file's metadata, keys in the documented order."""
    meta = {"format": FORMAT, "kind": "scores", "version": __version__, **fields}
    missing = [k for k in SCORE_KEYS if k not in meta]
    if missing:
        raise ValueError(f"score metadata lacks {missing}")
    return {k: meta[k] for k in SCORE_KEYS} | {k: v for k, v in meta.items() if k not in SCORE_KEYS}


def write_scores(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    """entries: name -> (indices int64 [K], scores float32 [K]) in rank order."""
    arrays = {}
    for name, (idx, sc) in entries.items():
        arrays[f"indices/{name}"] = np.ascontiguousarray(idx, dtype=np.int64)
        arrays[f"scores/{name}"] = np.ascontiguousarray(sc, dtype=np.float32)
    _save(path, arrays, meta)


def write_selection(path: Path, selected: dict[str, np.ndarray], meta: dict) -> None:
    meta = {"format": FORMAT, "kind": "selection", "version": __version__, **meta}
    meta = {k: meta[k] for k in SELECTION_KEYS} | {k: v for k, v in meta.items() if k not in SELECTION_KEYS}
    arrays = {f"indices/{n}": np.ascontiguousarray(a, dtype=np.int64) for n, a in selected.items()}
    _save(path, arrays, meta)


def check_replaceable(path: Path, kind: str, flag: str = "-o") -> None:
    """An existing output is replaced only when it is a spinctl file of the same kind: an -o
    pointed at model weights, a manifest or a FIFO by mistake must not destroy it."""
    p = Path(path)
    if not p.exists() or p.is_dir():  # new, or a directory: the writers say what that means
        return
    try:
        meta = untrusted.loads((read_shard(p).metadata or {})["spinctl"])
        same = isinstance(meta, dict) and meta.get("kind") == kind
    except (InputError, KeyError, ValueError):
        same = False
    if not same:
        raise OutputError(f"{path}: exists and is not a spinctl {kind} file; remove it or choose another {flag}")


def _load(path: Path, kind: str, keys: tuple[str, ...]) -> tuple[dict, dict[str, np.ndarray]]:
    """Validate the header and metadata ourselves, then let safetensors read the arrays."""
    from safetensors import SafetensorError, safe_open

    shard = read_shard(path)
    if "spinctl" not in (shard.metadata or {}):
        raise InputError(f"{path}: not a spinctl {kind} file (no spinctl metadata)")
    try:
        meta = untrusted.loads(shard.metadata["spinctl"])
    except ValueError as e:
        raise InputError(f"{path}: the spinctl metadata is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise InputError(f"{path}: expected a {kind} file, found kind {found!r}")
    if meta.get("format") != FORMAT:
        raise InputError(
            f"{path}: format {meta.get('format')!r} is not supported (this spinctl reads format {FORMAT}); upgrade spinctl"
        )
    missing = [k for k in keys if k not in meta]
    if missing:
        raise InputError(f"{path}: metadata lacks {', '.join(missing)}")
    if not isinstance(meta["shapes"], dict):
        raise InputError(f"{path}: metadata lacks the tensor shapes")
    _check_shapes(path, meta["shapes"])
    try:
        with safe_open(str(path), framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:  # TypeError: a dtype numpy lacks (BF16)
        raise InputError(f"{path}: cannot read arrays ({e})") from None
    return meta, arrays


def _split(
    path: Path, arrays: dict[str, np.ndarray], prefixes: tuple[str, ...], shapes: dict
) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {p: {} for p in prefixes}
    for key, arr in arrays.items():
        prefix, _, name = key.partition("/")
        if prefix not in out or not name:
            raise InputError(f"{path}: unexpected array {key!r}")
        if arr.ndim != 1:
            raise InputError(f"{path}: array {key} must be 1-D")
        out[prefix][name] = arr
    for prefix in prefixes:
        if set(out[prefix]) != set(shapes):
            name = sorted(set(out[prefix]) ^ set(shapes))[0]
            raise InputError(f"{path}: tensor {name} is missing from {prefix}/ or from the shapes metadata")
    return out


def _check_shapes(path: Path, shapes: dict) -> None:
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InputError(f"{path}: shape of {name} must be a list of non-negative integers")
        if math.prod(shape) >= 2**62:  # no real tensor; past 2^63 numpy's index arithmetic overflows
            raise InputError(f"{path}: shape of {name} {shape} is impossibly large; the file is corrupt")


def read_scores(path: Path) -> ScoreFile:
    from spinctl_kernels import check_ranked

    path = Path(path)
    meta, arrays = _load(path, "scores", SCORE_KEYS)
    keep = meta["keep"]
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise InputError(f"{path}: keep must be in (0, 1], found {keep!r}")
    shapes = meta["shapes"]
    parts = _split(path, arrays, ("indices", "scores"), shapes)
    for name, idx in parts["indices"].items():
        sc = parts["scores"][name]
        n = math.prod(shapes[name])
        if idx.dtype != np.int64 or sc.dtype != np.float32 or len(idx) != len(sc):
            raise InputError(f"{path}: tensor {name}: indices must be int64 and scores float32 of equal length")
        if len(idx) > keep_count(keep, n):
            raise InputError(
                f"{path}: tensor {name} holds {len(idx)} entries, more than keep={keep} allows ({keep_count(keep, n)})"
            )
        bad = check_ranked(idx, sc, n)
        if bad >= 0:
            raise InputError(
                f"{path}: tensor {name}: entry {bad} is out of range, repeated, non-positive or out of rank order"
            )
    return ScoreFile(path, meta, parts["indices"], parts["scores"])


def read_selection(path: Path) -> SelectionFile:
    from spinctl_kernels import is_sorted_unique

    path = Path(path)
    meta, arrays = _load(path, "selection", SELECTION_KEYS)
    shapes = meta["shapes"]
    indices = _split(path, arrays, ("indices",), shapes)["indices"]
    for name, idx in indices.items():
        n = math.prod(shapes[name])
        if idx.dtype != np.int64 or not is_sorted_unique(idx) or (len(idx) and not 0 <= idx[0] <= idx[-1] < n):
            raise InputError(f"{path}: tensor {name}: indices must be int64, sorted, unique and below {n}")
    return SelectionFile(path, meta, indices)
