"""Byte-range edits of safetensors files: plan ranges, stream-copy with edits and hashes, pwrite in place."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl.errors import InputError
from spinctl.io.checkpoint import TensorEntry
from spinctl.progress import Advance

CHUNK = 8 << 20  # 8 MiB: large enough for fast I/O, small enough that memory stays flat


@dataclass(frozen=True)
class Edits:
    """Byte ranges of one file to overwrite: with zeros (payload None) or with payload bytes in range order."""

    starts: np.ndarray  # int64 [r], absolute file offsets, ascending
    lengths: np.ndarray  # int64 [r]
    payload: bytes | None = None

    @classmethod
    def none(cls) -> Edits:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __bool__(self) -> bool:
        return len(self.starts) > 0


def tensor_ranges(t: TensorEntry, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from spinctl_kernels import coalesce_ranges, is_sorted_unique

    # The last guard before a write: a range outside the tensor would corrupt its neighbours.
    if len(indices) and not (0 <= indices[0] and indices[-1] < t.numel and is_sorted_unique(indices)):
        raise InputError(
            f"{t.file}: tensor {t.name}: indices to edit are unsorted, repeated or outside its {t.numel} elements"
        )
    return coalesce_ranges(indices, t.itemsize, t.begin)


def file_edits(items: list[tuple[TensorEntry, np.ndarray, bytes | None]]) -> Edits:
    """Merge per-tensor edits of one file (tensors never overlap, so ordering by begin sorts the ranges)."""
    items = sorted(items, key=lambda it: it[0].begin)
    parts = [tensor_ranges(t, idx) for t, idx, _ in items]
    if not parts:
        return Edits.none()
    starts = np.concatenate([p[0] for p in parts])
    lengths = np.concatenate([p[1] for p in parts])
    payloads = [v for _, _, v in items]
    for t, idx, v in items:
        if v is not None and len(v) != len(idx) * t.itemsize:
            raise InputError(
                f"{t.file}: tensor {t.name}: {len(v)} bytes to restore for {len(idx)} elements of {t.dtype}"
            )
    payload = None if all(v is None for v in payloads) else b"".join(payloads)
    return Edits(starts, lengths, payload)


def read_ranges(path: Path, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """The bytes of the ranges, concatenated (the original values before a patch)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return b"".join(_pread_full(fd, int(n), int(s)) for s, n in zip(starts, lengths))
    finally:
        os.close(fd)


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise OSError(f"short read at byte {offset}")
    return data


def _apply(chunk: memoryview, pos: int, edits: Edits, cursor: list[int]) -> bool:
    """Apply the edits that overlap chunk [pos, pos+len); cursor = [range index, payload offset]."""
    end, changed = pos + len(chunk), False
    starts, lengths = edits.starts, edits.lengths
    i, poff = cursor
    while i < len(starts) and starts[i] < end:
        s, n = int(starts[i]), int(lengths[i])
        a, b = max(s, pos), min(s + n, end)
        if edits.payload is None:
            chunk[a - pos : b - pos] = bytes(b - a)
        else:
            chunk[a - pos : b - pos] = edits.payload[poff + a - s : poff + b - s]
        changed = True
        if s + n > end:  # the range continues in the next chunk
            break
        i, poff = i + 1, poff + n
    cursor[:] = [i, poff]
    return changed


def stream(
    src: Path,
    edits: Edits,
    dst: Path | None = None,
    hash_before: bool = True,
    hash_after: bool = True,
    advance: Advance | None = None,
) -> tuple[str | None, str | None]:
    """One pass over `src`: hash, apply edits, hash again, write to `dst`; returns (before, after) hex digests.

    Without edits the two digests are one hash (the bytes are the same).
    """
    h_before = hashlib.sha256() if hash_before or (hash_after and not edits) else None
    h_after = hashlib.sha256() if hash_after and edits else None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    cursor, pos = [0, 0], 0
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) if dst else _null() as fout:
        while n := fin.readinto(buf):
            chunk = view[:n]
            if h_before:
                h_before.update(chunk)
            if edits:
                _apply(chunk, pos, edits, cursor)
            if h_after:
                h_after.update(chunk)
            if fout:
                _write_full(fout, chunk)
            pos += n
            if advance:
                advance(n)
        if fout:
            os.fsync(fout.fileno())
    before = h_before.hexdigest() if h_before else None
    after = h_after.hexdigest() if h_after else before if hash_after else None
    return (before if hash_before else None), after


def _write_full(f, data: memoryview) -> None:
    while data:
        data = data[f.write(data) :]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def copy_then_pwrite(src: Path, dst: Path, edits: Edits) -> None:
    """--no-hash copy: kernel-side copy, then write the edits; no bytes pass through Python."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size, off = os.fstat(fin.fileno()).st_size, 0
        while off < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), size - off, off, off)
            if n == 0:
                raise OSError(f"{src}: copy stopped at byte {off} of {size}")
            off += n
        pwrite_edits(fout.fileno(), edits)
        os.fsync(fout.fileno())


def write_in_place(path: Path, edits: Edits) -> None:
    """Apply the edits to `path` itself and fsync: the only writes into an input file."""
    if not edits:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        pwrite_edits(fd, edits)
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_edits(fd: int, edits: Edits) -> None:
    """Idempotent range writes: rerunning them after a crash reaches the same bytes."""
    poff = 0
    for s, n in zip(edits.starts.tolist(), edits.lengths.tolist()):
        data = bytes(n) if edits.payload is None else edits.payload[poff : poff + n]
        if os.pwrite(fd, data, s) != n:
            raise OSError(f"short write at byte {s}")
        poff += n
