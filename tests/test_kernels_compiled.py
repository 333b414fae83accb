"""The two kernel paths: the module compiled at install time against numba's JIT, byte for byte, and the JIT fallback.

test_kernels.py checks whichever path is active against slow references; here the same public
calls run on both paths and must give identical bytes, dtypes and types, and a missing, broken or
stale compiled module must fall back with exactly one notice line.
"""

import importlib
import sys

import numpy as np
import pytest
from test_kernels import random_set, score_array

import spinctl_kernels as K
from spinctl_kernels import exports, native


@pytest.fixture(autouse=True)
def fresh_choice():
    native.reset()  # each test chooses afresh under its own environment
    yield
    native.reset()


@pytest.fixture
def compiled():
    module, why = native.probe()
    if module is None:
        pytest.skip(f"compiled kernels not in use here ({why or 'SPINCTL_KERNELS=jit'}): `make install` builds them")
    return module


def calls():
    """(public function, args) pairs reaching every exported kernel: both top-k paths, all three set paths."""
    rng = np.random.default_rng(7)
    out = []
    for kind in ("uniform", "ties", "sparse", "wide"):
        for n in (1000, 300_000):  # 300k: the sampled path
            s = score_array(rng, n, kind)
            out += [(K.topk_indices, (s, k)) for k in (1, 17, n // 10, n + 3)]
    miss = np.where(np.arange(1_200_000) % 251 == 0, 2.0, 1.0).astype(np.float32)  # sampled guess too high
    out += [(K.topk_indices, (miss, 5000)), (K.topk_indices, ([np.nan, -1.0, 0.0, np.inf, 1e-45, 3.0], 10))]
    s = score_array(rng, 5000, "ties")
    idx = K.topk_indices(s, 800)
    sc = s[idx].copy()
    sc[700:] = 0
    for k in (0, 10, 650, 800, 10_000):
        out += [(K.rank_prefix, (idx, sc, k)), (K.prefix_set, (idx, sc, k))]
    bad = idx.copy()
    bad[300] = bad[10]
    out += [(K.check_ranked, (i, s[idx], 5000)) for i in (idx, bad)] + [(K.check_ranked, (idx, s[idx][:-1], 5000))]
    for na, nb in [(0, 5), (200, 200), (8_000, 40_000), (40_000, 9_000), (30_000, 40_000)]:
        a, b = random_set(rng, 4 * max(na, nb), na / (4 * max(na, nb))), random_set(rng, 4 * max(na, nb), 0.25)
        out += [(f, (a, b)) for f in (K.isin_sorted, K.intersect_sorted, K.difference_sorted)]
    a = random_set(rng, 100_000, 0.1, runs=True)
    out += [(K.is_sorted_unique, (a,)), (K.is_sorted_unique, (a[::-1],)), (K.coalesce_ranges, (a, 2, 64))]
    return out


def frozen(x):
    # What "byte-identical" compares: type, and for arrays dtype, shape and bytes.
    if isinstance(x, tuple):
        return tuple(frozen(y) for y in x)
    if isinstance(x, np.ndarray):
        return ("ndarray", x.dtype.str, x.shape, x.tobytes())
    return (type(x).__name__, x)


def run_all(expect: str):
    assert native.backend() == expect
    return [frozen(fn(*args)) for fn, args in calls()]


def test_compiled_matches_jit(compiled, monkeypatch, capsys):
    assert set(exports.EXPORTS) <= set(dir(compiled))
    got = run_all("compiled")
    native.reset()
    monkeypatch.setenv(native.ENV, "jit")
    want = run_all("jit")
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"call {i}: compiled and JIT results differ"
    assert capsys.readouterr().err == ""  # neither path, when chosen, prints anything


def test_compiled_arrays_are_writable(compiled):
    out = native.prefix(np.array([5, 2, 9], np.int64), np.ones(3, np.float32), 3)
    out.sort()  # prefix_set sorts the kernel's result in place
    assert out.tolist() == [2, 5, 9]


def without_compiled(monkeypatch, error: Exception | None):
    """The compiled module made missing (error None) or failing to import with `error`."""
    monkeypatch.delenv(native.ENV, raising=False)
    if error is None:
        monkeypatch.setitem(sys.modules, f"spinctl_kernels.{exports.MODULE}", None)  # import raises ModuleNotFoundError
        return
    real = importlib.import_module

    def failing(name, *a, **kw):
        if name.endswith(exports.MODULE):
            raise error
        return real(name, *a, **kw)

    monkeypatch.setattr(native.importlib, "import_module", failing)


@pytest.mark.parametrize(
    "error, reason",
    [
        (None, "(not built)"),
        (
            ImportError("_compiled.so: undefined symbol: NRT_MemInfo_new\nsecond line"),
            "(ImportError: _compiled.so: undefined symbol",
        ),
    ],
)
def test_fallback_same_answers_one_notice(monkeypatch, capsys, error, reason):
    want = [frozen(fn(*args)) for fn, args in calls()]  # whichever path this machine has
    capsys.readouterr()
    native.reset()
    without_compiled(monkeypatch, error)
    got = run_all("jit")
    got += run_all("jit")  # a second round: still one notice
    assert got == want + want
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spinctl: compiled kernels unavailable ") and reason in err, err


def test_stale_module_falls_back(compiled, monkeypatch, capsys):
    monkeypatch.setattr(native, "sources_digest", lambda: compiled.sources_digest() ^ 1)
    assert native.backend() == "jit"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale" in err and "make install" in err, err


def test_jit_on_request_is_silent(monkeypatch, capsys):
    monkeypatch.setenv(native.ENV, "jit")
    assert native.backend() == "jit" and native.probe() == (None, None)
    np.testing.assert_array_equal(K.topk_indices([1.0, 3.0, 2.0], 2), [1, 2])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("mode", ["compiled", "jit"])
def test_kernel_arguments_checked(mode, monkeypatch):
    # A compiled kernel handed an int32 array or a strided view would read the wrong memory (or
    # crash the process): the dispatch refuses it with a TypeError on both paths.
    if mode == "jit":
        monkeypatch.setenv(native.ENV, "jit")
    elif native.probe()[0] is None:
        pytest.skip("compiled kernels not in use here")
    assert native.backend() == mode
    with pytest.raises(TypeError, match="1-D C-contiguous int64"):
        native.is_sorted_unique(np.arange(5, dtype=np.int32))
    with pytest.raises(TypeError, match="1-D C-contiguous int64"):
        native.is_sorted_unique(np.arange(10, dtype=np.int64)[::2])
    with pytest.raises(TypeError, match="takes 3 arguments"):
        native.coalesce(np.arange(3, dtype=np.int64), 2)


def test_build_signatures_cover_exports():
    pytest.importorskip("numba")
    from numba import types

    from spinctl_kernels.aot_build import numba_args

    assert numba_args((np.int32, int, bool)) == (types.Array(types.int32, 1, "C"), types.int64, types.boolean)
    for module, function, _kinds in exports.EXPORTS.values():
        assert hasattr(getattr(importlib.import_module(f"spinctl_kernels.{module}"), function), "py_func")
