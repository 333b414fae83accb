"""The numba kernels against plain numpy/Python references on random data and edge cases."""

import numpy as np
import pytest

from spinctl_kernels import (
    check_ranked,
    coalesce_ranges,
    difference_sorted,
    intersect_sorted,
    is_sorted_unique,
    isin_sorted,
    prefix_set,
    rank_prefix,
    topk_indices,
)

SEEDS = [0, 1, 2]


# ---- references: slow and obviously right -------------------------------------------


def ref_topk(scores, k):
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    order = np.lexsort((np.arange(s.size), -s))  # score desc, then index asc
    order = order[s[order] > 0]  # drops zeros, negatives and NaN
    return order[:k].astype(np.int64)


def ref_prefix(indices, scores, k):
    return np.array([i for i, s in zip(indices[:k], scores[:k]) if s > 0], dtype=np.int64)


def ref_check(indices, scores, n):
    seen = set()
    for i, (x, s) in enumerate(zip(indices.tolist(), scores.tolist())):
        ok = 0 <= x < n and np.isfinite(s) and s > 0 and x not in seen
        if i > 0:
            p, px = scores[i - 1], indices[i - 1]
            ok = ok and (s < p or (s == p and x > px))
        if not ok:
            return i
        seen.add(x)
    return -1


def score_array(rng, n, kind):
    if kind == "uniform":
        return rng.random(n, dtype=np.float32)
    if kind == "ties":  # a few distinct values, so ties are everywhere, plus zeros
        return rng.integers(0, 4, n).astype(np.float32) * np.float32(0.25)
    if kind == "sparse":  # mostly zeros, as a score over a few hot rows would be
        s = rng.random(n, dtype=np.float32)
        s[rng.random(n) < 0.9] = 0
        return s
    if kind == "wide":  # many exponents, so the high-bits histogram spreads out
        return (rng.standard_exponential(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    raise ValueError(kind)


def random_set(rng, n, frac, runs=False):
    mask = rng.random(n) < frac
    if runs:  # long stretches of consecutive elements
        starts = rng.integers(0, n, max(1, int(n * frac / 20)))
        for s in starts:
            mask[s : s + rng.integers(1, 40)] = True
    return np.flatnonzero(mask).astype(np.int64)


# ---- top-k ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["uniform", "ties", "sparse", "wide"])
@pytest.mark.parametrize("n", [1, 7, 1000, 200_000, 300_000])  # 300k: the sampled fast path
def test_topk_random(seed, kind, n):
    rng = np.random.default_rng(seed)
    s = score_array(rng, n, kind)
    ranked = ref_topk(s, n)
    for k in sorted({0, 1, 5, n // 1000, n // 10, n - 1, n, n + 3}):
        got = topk_indices(s, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ranked[:k], err_msg=f"k={k}")


def test_topk_edges():
    assert topk_indices(np.zeros(0, np.float32), 5).size == 0
    assert topk_indices(np.zeros(100, np.float32), 5).size == 0
    assert topk_indices(np.ones(100, np.float32), 0).size == 0
    np.testing.assert_array_equal(topk_indices(np.ones(10, np.float32), 3), [0, 1, 2])
    np.testing.assert_array_equal(topk_indices([2.0], 3), [0])
    bad = [np.nan, -1.0, -0.0, 0.0, np.inf, 1e-45, 3.0, np.float32(3.0)]
    np.testing.assert_array_equal(topk_indices(bad, 10), [4, 6, 7, 5])
    # a signalling NaN sits in +inf's high-bits bin; it must not be taken for a score
    snan = np.array([0x7F800001, 0x7F800000, 0x7F800000, 0x3F800000], np.uint32).view(np.float32)
    for k in range(5):
        np.testing.assert_array_equal(topk_indices(snan, k), ref_topk(snan, k))
    # equal float32 values that differ as float64 compare equal once converted
    s64 = np.array([1.0, 1.0 + 1e-12, 1.0 - 1e-12, 0.5])
    np.testing.assert_array_equal(topk_indices(s64, 2), [0, 1])
    # 2-D input: flat row-major index
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(topk_indices(m, 2), [11, 10])
    with pytest.raises(ValueError):
        topk_indices([1.0], -1)


def test_topk_sample_misses():
    # The fast path guesses a threshold from every 251st score; make the guess wrong both ways.
    n = 1_200_000
    sampled = np.zeros(n, bool)
    sampled[::251] = True
    high = np.where(sampled, 2.0, 1.0).astype(np.float32)  # guess too high: too few candidates
    low = np.where(sampled, 0.0, 1.0).astype(np.float32)  # guess lets all in: over the 2**20 cap
    low[7] = 3.0
    for s in (high, low):
        ranked = ref_topk(s, n)
        for k in [1, 10, 5000, 20_000]:
            np.testing.assert_array_equal(topk_indices(s, k), ranked[:k], err_msg=f"k={k}")


def test_topk_heavy_ties_rescan():
    # More equal scores in the boundary bin than fit the candidate buffer: pass 3 rescans.
    n = 1_400_000
    s = np.full(n, 0.5, np.float32)
    s[::7] = 0
    s[123_456] = 2.0
    for k in [1, 2, 1000, n // 2, n]:
        np.testing.assert_array_equal(topk_indices(s, k), ref_topk(s, k), err_msg=f"k={k}")


# ---- ranked entries ------------------------------------------------------------------


def ranked_entry(rng, n, K, ties=True):
    s = score_array(rng, n, "ties" if ties else "uniform")
    idx = ref_topk(s, K)
    return idx, s[idx]


@pytest.mark.parametrize("seed", SEEDS)
def test_prefix(seed):
    rng = np.random.default_rng(seed)
    idx, sc = ranked_entry(rng, 5000, 800)
    sc = sc.copy()
    sc[700:] = 0  # zero scores at the tail must be dropped, as must NaN
    sc[650] = np.nan
    for k in [0, 1, 10, 650, 651, 700, 799, 800, 10_000]:
        want = ref_prefix(idx, sc, k)
        np.testing.assert_array_equal(rank_prefix(idx, sc, k), want)
        got = prefix_set(idx, sc, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.sort(want))
    assert prefix_set([], [], 5).size == 0
    np.testing.assert_array_equal(prefix_set([9, 2, 5], [3.0, 2.0, 1.0], 2), [2, 9])
    np.testing.assert_array_equal(rank_prefix([9, 2, 5], [3.0, 2.0, 1.0], 2), [9, 2])
    with pytest.raises(ValueError):
        prefix_set([1, 2], [1.0], 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_check_ranked(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    idx, sc = ranked_entry(rng, n, 400, ties=seed % 2 == 0)
    assert check_ranked(idx, sc, n) == -1
    assert check_ranked(idx[:0], sc[:0], n) == -1
    for _ in range(60):
        i2, s2 = idx.copy(), sc.copy()
        p = int(rng.integers(0, idx.size))
        what = rng.integers(0, 6)
        if what == 0:
            i2[p] = rng.choice([-1, n, n + 5])
        elif what == 1:
            s2[p] = rng.choice([0.0, -1.0, np.nan, np.inf])
        elif what == 2:
            i2[p] = i2[rng.integers(0, idx.size)]  # a repeat (or itself: still valid)
        elif what == 3 and p > 0:
            i2[p], i2[p - 1] = i2[p - 1], i2[p]
        elif what == 4 and p > 0:
            s2[p], s2[p - 1] = s2[p - 1], s2[p]
        else:
            s2[p] = np.float32(s2[p] * rng.choice([0.5, 2.0]))
        assert check_ranked(i2, s2, n) == ref_check(i2, s2, n)
    assert check_ranked([0, 0], [2.0, 1.0], 5) == 1
    assert check_ranked([4, 0, 4], [3.0, 2.0, 1.0], 5) == 2
    assert check_ranked([1, 2], [1.0, 1.0], 5) == -1
    assert check_ranked([2, 1], [1.0, 1.0], 5) == 1
    assert check_ranked([1, 2], [1.0], 5) == 1


# ---- sorted sets ---------------------------------------------------------------------


# balanced sizes take the merge, ratios >= GALLOP (4) the galloping search, either way round
SET_SIZES = [
    (0, 0),
    (0, 50),
    (50, 0),
    (1, 1),
    (200, 200),
    (30_000, 40_000),
    (8_000, 40_000),
    (40_000, 9_000),
    (20, 50_000),
    (50_000, 20),
    (100_000, 3),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("na,nb", SET_SIZES)
def test_sets_random(seed, na, nb):
    rng = np.random.default_rng(seed)
    universe = 4 * max(na, nb, 1)
    a = np.sort(rng.choice(universe, na, replace=False)).astype(np.int64)
    # b shares about half of its elements with a, so hits and misses both occur
    shared = rng.choice(a, min(na, nb // 2), replace=False) if na else np.zeros(0, np.int64)
    rest = np.setdiff1d(rng.choice(universe, nb, replace=False), a)[: nb - shared.size]
    b = np.sort(np.concatenate([shared, rest])).astype(np.int64)
    check_sets(a, b)


def check_sets(a, b):
    for x, y in [(a, b), (b, a)]:
        np.testing.assert_array_equal(isin_sorted(x, y), np.isin(x, y))
        got = intersect_sorted(x, y)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.intersect1d(x, y))
        np.testing.assert_array_equal(difference_sorted(x, y), np.setdiff1d(x, y))


def test_sets_edges():
    a = np.arange(0, 1000, 3, dtype=np.int64)
    check_sets(a, a)  # a == b
    check_sets(a, a + 1)  # disjoint, interleaved
    check_sets(a, a + 10_000)  # disjoint, one after the other
    check_sets(a, np.zeros(0, np.int64))  # one empty
    check_sets(np.array([5]), np.array([5]))
    check_sets(np.array([-7, 0, 2**62]), np.array([-7, 2**62]))
    assert isin_sorted([], [1, 2]).dtype == np.bool_
    np.testing.assert_array_equal(intersect_sorted([1, 3, 5], [3, 5, 7]), [3, 5])
    np.testing.assert_array_equal(difference_sorted([1, 3, 5], [3]), [1, 5])
    with pytest.raises(ValueError):
        isin_sorted(np.zeros((2, 2)), [1])


def test_is_sorted_unique():
    assert is_sorted_unique([])
    assert is_sorted_unique([4])
    assert is_sorted_unique([-1, 0, 9])
    assert not is_sorted_unique([1, 1])
    assert not is_sorted_unique([2, 1])
    rng = np.random.default_rng(0)
    a = random_set(rng, 100_000, 0.1)
    assert is_sorted_unique(a)
    a[len(a) // 2] = a[len(a) // 2 - 1]
    assert not is_sorted_unique(a)


# ---- byte ranges ---------------------------------------------------------------------


def covered_bytes(starts, lengths):
    return {b for s, n in zip(starts.tolist(), lengths.tolist()) for b in range(s, s + n)}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_coalesce_random(seed, runs, itemsize):
    rng = np.random.default_rng(seed)
    idx = random_set(rng, 20_000, 0.05 if runs else 0.3, runs=runs)
    base = int(rng.integers(8, 10_000))
    starts, lengths = coalesce_ranges(idx, itemsize, base)
    assert starts.dtype == lengths.dtype == np.int64
    want = {base + i * itemsize + j for i in idx.tolist() for j in range(itemsize)}
    assert covered_bytes(starts, lengths) == want
    assert (lengths > 0).all()
    ends = starts + lengths
    assert (starts[1:] > ends[:-1]).all()  # sorted, disjoint and never touching: merged
    # against the numpy diff-based version
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    first = idx[np.r_[0, brk]]
    last = idx[np.r_[brk - 1, idx.size - 1]]
    np.testing.assert_array_equal(starts, base + first * itemsize)
    np.testing.assert_array_equal(lengths, (last - first + 1) * itemsize)


def test_coalesce_edges():
    s, n = coalesce_ranges(np.zeros(0, np.int64), 2, 100)
    assert s.size == n.size == 0 and s.dtype == np.int64
    s, n = coalesce_ranges([7], 2, 100)
    assert s.tolist() == [114] and n.tolist() == [2]
    s, n = coalesce_ranges(np.arange(10, 20), 4, 8)
    assert s.tolist() == [48] and n.tolist() == [40]
    s, n = coalesce_ranges([0, 2, 3, 5], 2, 0)
    assert s.tolist() == [0, 4, 10] and n.tolist() == [2, 4, 2]
    with pytest.raises(ValueError):
        coalesce_ranges([1], 0, 0)
