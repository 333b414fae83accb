"""Top-k sets (docs/design.md §3): dense top-k of a score array, prefixes and checks of ranked score-file entries."""

import numpy as np
from numba import njit

from . import native

# Scores are compared through their float32 bit patterns viewed as int32: for positive
# floats the order of the bits is the order of the values, negative floats (and -0.0)
# have the sign bit set (negative int32), +inf is 0x7F800000 and NaNs lie above it.
# So "0 < bits <= _INF" is exactly "score > 0 and not NaN", with no float compare.
_INF = 0x7F800000
_NHI = (_INF >> 16) + 1  # bins of the first pass: the high 16 bits of a valid score
# Sample stride of the fast path: prime, so a sample of an [out, in] weight's scores sees
# every column (a power-of-two stride would see only some, and miss outlier channels).
_STRIDE = 251
_MIN_SAMPLED = 1 << 18  # below this the histogram passes are cheap enough


@njit(cache=True)
def _sample_threshold(v, k):
    # Bits t such that, very likely, slightly more than k scores are >= t: the matching
    # quantile of a strided sample, moved down by 4 standard deviations of its count.
    n = v.size
    m = (n + _STRIDE - 1) // _STRIDE
    samp = np.empty(m, np.int32)
    c = 0
    for i in range(0, n, _STRIDE):
        x = v[i]
        if 0 < x <= _INF:
            samp[c] = x
            c += 1
    mu = k * m / n  # expected sample count at or above the true k-th largest
    ks = int(mu + 4.0 * np.sqrt(mu) + 4.0)
    if ks >= c:
        return np.int32(1)  # the smallest positive float: every positive score is a candidate
    return np.partition(samp[:c], c - ks)[c - ks]


@njit(cache=True)
def _topk_sampled(v, k, cap):
    # One streaming pass collects the indices with bits >= t (few: ~k plus a margin);
    # exact whenever that yields at least k candidates, or t lets every positive score in.
    # Returns (ok, result); not ok when the guess was too high or let in more than cap.
    t = _sample_threshold(v, k)
    cand = np.empty(cap, np.int64)
    c = 0
    n = v.size
    # Blocks of 64: a branch-free "any >= t" per block vectorises; only the rare hit blocks
    # run the scalar collect. (A plain per-element branch measured 4x slower: 88 vs 23 ms.)
    for start in range(0, n, 64):
        end = min(start + 64, n)
        hit = False
        for i in range(start, end):
            hit |= v[i] >= t
        if hit:
            for i in range(start, end):
                x = v[i]
                if x >= t and x <= _INF:
                    if c == cap:
                        return False, cand[:0]
                    cand[c] = i
                    c += 1
    if c < k and t > 1:
        return False, cand[:0]
    cand = cand[:c]  # index ascending, so a stable sort on descending score ranks ties right
    neg = np.empty(c, np.int64)
    for i in range(c):
        neg[i] = -np.int64(v[cand[i]])
    return True, cand[np.argsort(neg, kind="mergesort")[:k]]


@njit(cache=True)
def _topk_core(v, k, cap):
    # v: int32 bit view of float32 scores [n]; 0 < k.  Two histogram passes find the exact
    # k-th largest bit pattern, so only ~k candidates are ever sorted (no argsort of n).
    # Always exact and O(k + cap) memory, whatever the ties: the fallback of the sampled path.
    n = v.size
    hist = np.zeros(_NHI, np.int64)
    for i in range(n):
        x = v[i]
        if 0 < x <= _INF:
            hist[x >> 16] += 1
    # b: the high-16 bin holding the k-th largest; above: how many lie in higher bins (< k)
    above = 0
    b = _NHI - 1
    while b >= 0 and above + hist[b] < k:
        above += hist[b]
        b -= 1
    if b < 0:  # k >= number of positive scores: all of them
        out = np.empty(above, np.int64)
        m = 0
        for i in range(n):
            x = v[i]
            if 0 < x <= _INF:
                out[m] = i
                m += 1
        return _rank_order(v, out)
    # Pass 2: take every index of a higher bin, histogram the low 16 bits of bin b, and keep
    # bin b's indices too when they are few (else pass 3 rescans: heavy ties stay O(k) memory).
    out = np.empty(k, np.int64)
    nb = hist[b]
    store = nb <= cap
    buf = np.empty(nb if store else 0, np.int64)
    lo = np.zeros(1 << 16, np.int64)
    m = 0
    j = 0
    for i in range(n):
        x = v[i]
        if 0 < x <= _INF:
            h = x >> 16
            if h > b:
                out[m] = i
                m += 1
            elif h == b:
                lo[x & 0xFFFF] += 1
                if store:
                    buf[j] = i
                    j += 1
    need = k - m
    t = (1 << 16) - 1
    acc = 0
    while acc + lo[t] < need:
        acc += lo[t]
        t -= 1
    key = (b << 16) | t  # exact bits of the k-th largest score
    r = need - acc  # how many scores equal to it enter: the smallest indices, i.e. the first seen
    # Pass 3: bin b's indices in index order, from the buffer or the whole array again.
    for jj in range(nb if store else n):
        i = buf[jj] if store else jj
        x = v[i]
        # bin b holds signalling NaNs above +inf; the buffer holds only bin b's positive scores
        if x <= _INF and (x >> 16) == b and (x > key or (x == key and r > 0)):
            if x == key:
                r -= 1
            out[m] = i
            m += 1
    return _rank_order(v, out)


@njit(cache=True)
def _rank_order(v, idx):
    # Index ascending first, then a stable sort on descending score: ties keep index order.
    idx.sort()
    neg = np.empty(idx.size, np.int64)
    for i in range(idx.size):
        neg[i] = -np.int64(v[idx[i]])
    return idx[np.argsort(neg, kind="mergesort")]


def topk_indices(scores, k) -> np.ndarray:
    """Flat indices of the k largest positive scores, in rank order (score desc, index asc).

    Scores are compared as float32 (the score files' dtype); scores <= 0 and NaN never
    enter, so the result has min(k, number of positive scores) entries. An N-D array is
    read in row-major order (the flat index of docs/design.md §3).
    """
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    v = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1).view(np.int32)
    if k == 0 or v.size == 0:
        return np.empty(0, np.int64)
    cap = max(4 * k, 1 << 20)
    if v.size >= _MIN_SAMPLED:
        ok, out = native.topk_sampled(v, k, cap)
        if ok:
            return out
    return native.topk_core(v, k, cap)


@njit(cache=True)
def _prefix(indices, scores, k):
    # First k entries with score > 0 (NaN fails "> 0" too); file order is kept.
    m = min(k, indices.size)
    out = np.empty(m, np.int64)
    c = 0
    for i in range(m):
        if scores[i] > 0:
            out[c] = indices[i]
            c += 1
    return out[:c].copy()


def _entry(indices, scores):
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    scores = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
    if indices.size != scores.size:
        raise ValueError(f"indices and scores differ in length: {indices.size} != {scores.size}")
    return indices, scores


def rank_prefix(indices, scores, k) -> np.ndarray:
    """The top-k set of a ranked score-file entry, in rank (file) order, as int64."""
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return native.prefix(*_entry(indices, scores), k)


def prefix_set(indices, scores, k) -> np.ndarray:
    """The top-k set of a ranked score-file entry, sorted ascending, as int64."""
    out = rank_prefix(indices, scores, k)
    out.sort()
    return out


@njit(cache=True)
def _check_ranked(indices, scores, n):
    # Returns the first position i whose entry is bad given entries [0, i), else -1.
    size = indices.size
    bad = size
    for i in range(size):
        x = indices[i]
        s = scores[i]
        if not (0 <= x < n) or not (0 < s < np.inf):
            bad = i
            break
        if i > 0:
            p = scores[i - 1]
            if s > p or (s == p and x <= indices[i - 1]):
                bad = i
                break
    # Repeats: among equal indices the later position is the violation. A stable sort
    # keeps positions ascending inside each group of equal indices.
    order = np.argsort(indices[:bad], kind="mergesort")
    for j in range(1, order.size):
        if indices[order[j]] == indices[order[j - 1]] and order[j] < bad:
            bad = order[j]
    return bad if bad < size else -1


def check_ranked(indices, scores, n) -> int:
    """-1 if a score-file entry is valid, else the position of its first bad entry.

    Valid: indices in [0, n) and unique, scores finite and > 0, ordered by score
    descending then index ascending. Entries of different lengths fail at the shorter end.
    """
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    scores = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
    m = min(indices.size, scores.size)
    bad = int(native.check_ranked(indices[:m], scores[:m], int(n)))
    if bad < 0 and indices.size != scores.size:
        return m
    return bad
