"""Numba kernels for spinctl: top-k sets, sorted-set operations, byte-range coalescing (numpy in, numpy out).

Imported as `spinctl_kernels` (pyproject's package-dir), not `kernels`: Hugging Face ships a
`kernels` package that transformers imports, and the two must not collide."""

from .ranges import coalesce_ranges
from .sets import difference_sorted, intersect_sorted, is_sorted_unique, isin_sorted
from .topk import check_ranked, prefix_set, rank_prefix, topk_indices

__all__ = [
    "check_ranked",
    "coalesce_ranges",
    "difference_sorted",
    "intersect_sorted",
    "is_sorted_unique",
    "isin_sorted",
    "prefix_set",
    "rank_prefix",
    "topk_indices",
]
