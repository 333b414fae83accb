"""The kernels compiled ahead of time: one table read by the build (aot_build.py) and by the dispatch (native.py).

An AOT function has one fixed signature, so each entry names the njit function and the exact
type of each argument the Python wrappers pass: a numpy dtype means a 1-D C-contiguous array
of that dtype, `int` an int64 scalar, `bool` a boolean. No numba import here: the dispatch
reads this table on every run, the build only when compiling.
"""

import hashlib
from pathlib import Path

import numpy as np

# compiled name: (kernel module, njit function, argument types)
EXPORTS = {
    "topk_sampled": ("topk", "_topk_sampled", (np.int32, int, int)),
    "topk_core": ("topk", "_topk_core", (np.int32, int, int)),
    "prefix": ("topk", "_prefix", (np.int64, np.float32, int)),
    "check_ranked": ("topk", "_check_ranked", (np.int64, np.float32, int)),
    "isin_merge": ("sets", "_isin_merge", (np.int64, np.int64, np.bool_)),
    "isin_gallop_a": ("sets", "_isin_gallop_a", (np.int64, np.int64, np.bool_)),
    "isin_gallop_b": ("sets", "_isin_gallop_b", (np.int64, np.int64, np.bool_)),
    "compress": ("sets", "_compress", (np.int64, np.bool_, bool)),
    "is_sorted_unique": ("sets", "_is_sorted_unique", (np.int64,)),
    "coalesce": ("ranges", "_coalesce", (np.int64, int, int)),
}

MODULE = "_compiled"  # the extension's name inside the package: spinctl_kernels._compiled

# What the compiled module was built from: a changed kernel or table makes it stale (native.py
# then falls back to the JIT), so an edited kernel never runs as its old compiled code.
SOURCES = ("exports.py", "topk.py", "sets.py", "ranges.py")


def sources_digest() -> int:
    """63-bit digest of SOURCES as they are now: the compiled module returns the one it was built from."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1
