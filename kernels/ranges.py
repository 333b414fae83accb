"""Byte ranges to zero in a safetensors file: element indices coalesced into runs (docs/design.md §6)."""

import numpy as np
from numba import njit

from . import native


@njit(cache=True)
def _coalesce(idx, itemsize, base):
    # idx sorted ascending, unique: a run is a stretch of consecutive indices.
    n = idx.size
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    runs = 1
    for i in range(1, n):
        runs += idx[i] != idx[i - 1] + 1
    starts = np.empty(runs, np.int64)
    lengths = np.empty(runs, np.int64)
    r = 0
    first = idx[0]
    for i in range(1, n + 1):
        if i == n or idx[i] != idx[i - 1] + 1:
            starts[r] = base + first * itemsize
            lengths[r] = (idx[i - 1] - first + 1) * itemsize
            r += 1
            if i < n:
                first = idx[i]
    return starts, lengths


def coalesce_ranges(flat_indices, itemsize, base) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges [starts[i], starts[i] + lengths[i]) covering the given elements.

    flat_indices: sorted ascending, unique element indices of a tensor whose data starts at
    absolute byte offset base; adjacent elements share one range. Returns int64 arrays.
    """
    idx = np.ascontiguousarray(flat_indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"expected 1-D flat indices, got shape {idx.shape}")
    itemsize, base = int(itemsize), int(base)
    if itemsize <= 0 or base < 0:
        raise ValueError(f"itemsize must be > 0 and base >= 0, got {itemsize} and {base}")
    return native.coalesce(idx, itemsize, base)
