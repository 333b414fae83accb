"""Checkpoint reading: safetensors headers parsed and validated, shards, index, fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from spinctl.errors import InputError, UnsupportedError
from spinctl.io import untrusted

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit; a larger length is corrupt

# Bits per element, as safetensors defines them (0.8: a tensor spans numel · bits / 8 bytes, and
# must end on a byte boundary). F4 and F6 are packed, several elements to a byte.
BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "F8_E4M3": 8,
    "F8_E4M3FN": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
    "C64": 64,
}
# Whole-byte dtypes: element i starts at byte i · itemsize. Sub-byte ones have no such offset.
ITEMSIZE = {d: b // 8 for d, b in BITS.items() if b % 8 == 0}
# IEEE-style floats whose all-zero bytes read +0.0: the only ones a byte-level patch may zero.
# Not F8_E8M0 (zero bytes are 2^-127, there is no zero), not integers or BOOL (not weights to
# suppress), not the packed F4/F6 (an element is not a byte range; quantized weights besides).
ZEROABLE = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E4M3FN", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"}


def tensor_nbytes(dtype: str, shape) -> int | None:
    """Bytes of a tensor, or None when its bits do not fill whole bytes (safetensors refuses those)."""
    bits = math.prod(shape) * BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: absolute offsets into its shard."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of element 0 in `file`
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        self.require_zeroable()  # callers address elements by byte: only patchable dtypes get here
        return ITEMSIZE[self.dtype]

    def require_zeroable(self) -> None:
        if self.dtype not in ZEROABLE:
            packed = f" ({BITS[self.dtype]}-bit elements packed into bytes)" if BITS[self.dtype] % 8 else ""
            raise UnsupportedError(
                f"{self.file}: tensor {self.name} has dtype {self.dtype}{packed}, which is never zeroed: only IEEE "
                f"floats ({', '.join(sorted(ZEROABLE))}) can be zeroed byte-wise; leave it out of the selection"
            )


@dataclass(frozen=True)
class Shard:
    """One validated safetensors file."""

    path: Path
    size: int
    data_start: int  # 8 + header length
    metadata: dict[str, str] | None
    tensors: dict[str, TensorEntry]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def read_shard(path: Path) -> Shard:
    """Parse and validate a safetensors header (docs/design.md §13); reads only the header bytes."""
    path = Path(path)
    untrusted.require_regular(path)  # a FIFO would block the read forever
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                raise InputError(
                    f"{path}: header length {n} runs past the end of the file ({size} bytes); the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a .safetensors file") from None
    try:
        header = untrusted.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path}: header is not valid UTF-8 JSON ({e}); the file is corrupt or not safetensors"
        ) from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        tensors[name] = _entry(path, name, info, data_start, data_len)
    _check_tiling(path, tensors, data_start, data_len)
    return Shard(path, size, data_start, metadata, tensors)


def _check_tiling(path: Path, tensors: dict[str, TensorEntry], data_start: int, data_len: int) -> None:
    """safetensors' own rule (it refuses the file at load otherwise): in offset order, each tensor
    starts where the previous one ends, the first at 0, and the last ends at the end of the file."""
    end, prev = 0, None  # relative to the data region
    for begin, stop, name in sorted((t.begin - data_start, t.end - data_start, t.name) for t in tensors.values()):
        if begin < end:
            raise InputError(f"{path}: tensors {prev} and {name} overlap; the header is corrupt")
        if begin > end:
            after = f"after tensor {prev} (ends at {end})" if prev is not None else "at the start of the data"
            raise InputError(
                f"{path}: tensor {name} starts at data offset {begin}, leaving {begin - end} byte(s) {after} "
                f"that no tensor covers; the header is corrupt (an entry missing?)"
            )
        end, prev = stop, name
    if end != data_len:
        raise InputError(
            f"{path}: the last {data_len - end} of its {data_len} data bytes belong to no tensor; "
            f"the file is corrupt (an entry missing from the header, or bytes appended)"
        )


def _entry(path: Path, name: str, info: object, data_start: int, data_len: int) -> TensorEntry:
    bad = f"{path}: tensor {name}"
    if not isinstance(info, dict):
        raise InputError(f"{bad}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in BITS:
        raise InputError(f"{bad}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError(f"{bad}: shape must be a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InputError(f"{bad}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InputError(
            f"{bad}: data_offsets [{begin}, {end}] fall outside the {data_len} data bytes; the file is truncated or corrupt"
        )
    nbytes = tensor_nbytes(dtype, shape)
    if nbytes is None:
        raise InputError(
            f"{bad}: shape {shape} of {dtype} is {math.prod(shape) * BITS[dtype]} bits, "
            f"not a whole number of bytes; the header is corrupt"
        )
    if end - begin != nbytes:
        raise InputError(f"{bad}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {nbytes}")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


@dataclass(frozen=True)
class Checkpoint:
    """A model: one .safetensors file, or a directory with shards and an optional index."""

    path: Path  # the file, or the directory
    is_file: bool
    shards: list[Shard]
    index_path: Path | None
    tensors: dict[str, TensorEntry] = field(repr=False)

    @property
    def root(self) -> Path:
        return self.path.parent if self.is_file else self.path

    def fingerprint(self) -> str:
        return fingerprint(self.tensors)

    def shard_of(self, path: Path) -> Shard:
        return next(s for s in self.shards if s.path == path)


def is_reserved(name: str) -> bool:
    """spinctl's own names: spin-* at the top of a model, NAME.spin-undo/-manifest beside a lone file.

    A weight file with such a name would be overwritten by (or mistaken for) an undo log or manifest.
    """
    return name.startswith("spin-") or ".spin-undo" in name or ".spin-manifest" in name


WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack"}


def fingerprint(tensors: dict[str, TensorEntry]) -> str:
    """docs/design.md §5: sha256 of the sorted {name: [dtype, shape]} JSON; independent of sharding."""
    desc = {name: [t.dtype, list(t.shape)] for name, t in tensors.items()}
    text = json.dumps(desc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def open_checkpoint(path: Path) -> Checkpoint:
    """Open and validate a model file or directory; reads headers only."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        shard = read_shard(path)
        return Checkpoint(path, True, [shard], None, dict(shard.tensors))
    index = path / INDEX_NAME
    if index.is_file():
        files = _index_files(index)
    elif (path / SINGLE_NAME).is_file():
        files = [SINGLE_NAME]
    else:
        raise InputError(
            f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME} found; pass a model directory or a .safetensors file"
        )
    shards = []
    for name in files:
        shard_path = path / name
        if not shard_path.is_file():
            raise InputError(
                f"{shard_path}: shard named in {index.name if index.is_file() else 'the model'} is missing"
            )
        shards.append(read_shard(shard_path))
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        for name, t in shard.tensors.items():
            if name in tensors:
                raise InputError(f"{shard.path}: tensor {name} also appears in {tensors[name].file.name}")
            tensors[name] = t
    if index.is_file():
        _check_index(index, tensors)
    return Checkpoint(path, False, shards, index if index.is_file() else None, tensors)


def weight_file_names(root: Path) -> list[str]:
    """The weight files a directory declares: its index's shards, else every .safetensors but the spin-* ones."""
    index = Path(root) / INDEX_NAME
    if index.is_file():
        return _index_files(index)
    return sorted(p.name for p in Path(root).glob("*.safetensors") if p.is_file() and not is_reserved(p.name))


def _index_files(index: Path) -> list[str]:
    try:
        data = untrusted.loads(index.read_text("utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index}: not a valid safetensors index ({e})") from None
    for fn in set(weight_map.values()):
        # A plain file name only: "../x" or "/x" would read (and patch) outside the model.
        # Not resolved, so shards that are symlinks (Hugging Face cache snapshots) still open.
        if fn in ("", ".", "..") or "/" in fn or "\\" in fn or not fn.endswith(".safetensors"):
            raise InputError(f"{index}: entry {fn!r} escapes the model directory or is not a .safetensors file name")
        if is_reserved(fn):
            raise InputError(
                f"{index}: shard name {fn!r} is reserved for spinctl's undo log and manifest (spin-*); rename the shard"
            )
    return sorted(set(weight_map.values()))


def _check_index(index: Path, tensors: dict[str, TensorEntry]) -> None:
    weight_map = untrusted.loads(index.read_text("utf-8"))["weight_map"]  # parsed once already: valid
    for name, fn in weight_map.items():
        t = tensors.get(name)
        if t is None or t.file.name != fn:
            raise InputError(f"{index}: tensor {name} is listed in {fn} but not found there")
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise InputError(f"{index}: tensor {extra[0]} is in {tensors[extra[0]].file.name} but not in the index")
