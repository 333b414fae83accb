"""Selection against brute-force Python sets computed from the dense scores, both modes."""

import math

import numpy as np
import pytest
from fakes import dense_scores, write_dense

from spinctl.errors import SpinctlError
from spinctl.io.formats import read_scores
from spinctl.selection import Mode, SelectConfig, run_select, select


def top_set(s: np.ndarray, frac: float) -> list[int]:
    """Plain §1: k = floor(f·n) largest, ties by smaller index, zeros never."""
    k = math.floor(frac * len(s) + 1e-9)
    ranked = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    return [i for i in ranked if s[i] > 0][:k]


def brute_paper(r, cs, p, q):
    chosen = set(top_set(cs[0], q))
    for c in cs[1:]:
        chosen &= set(top_set(c, q))
    return sorted(chosen - set(top_set(r, p)))


def brute_reference(r, a, b, p, q):
    ua, ub, rs = sorted(top_set(a, q)), sorted(top_set(b, q)), set(top_set(r, p))
    return [ua[i] for i in range(min(len(ua), len(ub))) if ua[i] not in rs and ub[i] not in rs]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", "float32")


@pytest.mark.parametrize("levels", [None, 4, 2])
@pytest.mark.parametrize("ncouple", [1, 2, 3])
@pytest.mark.parametrize("p,q", [(0.01, 0.05), (0.05, 0.05), (0.0, 0.02), (0.03, 0.0)])
def test_paper_mode_matches_sets(model, tmp_path, levels, ncouple, p, q):
    dense = [dense_scores(model, seed, levels) for seed in range(ncouple + 1)]
    files = [write_dense(model, tmp_path / f"s{i}.safetensors", d, keep=0.05) for i, d in enumerate(dense)]
    got = select(read_scores(files[0]), [read_scores(f) for f in files[1:]], p, q, Mode.paper)
    for name in dense[0]:
        want = brute_paper(dense[0][name], [d[name] for d in dense[1:]], p, q)
        assert got[name].dtype == np.int64 and got[name].tolist() == want, name


@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("p,q", [(0.01, 0.05), (0.05, 0.02)])
def test_reference_mode_matches_positional_and(model, tmp_path, levels, p, q):
    dense = [dense_scores(model, seed, levels) for seed in (10, 11, 12)]
    files = [write_dense(model, tmp_path / f"s{i}.safetensors", d, keep=0.05) for i, d in enumerate(dense)]
    got = select(read_scores(files[0]), [read_scores(f) for f in files[1:]], p, q, Mode.reference)
    for name in dense[0]:
        assert got[name].tolist() == brute_reference(dense[0][name], dense[1][name], dense[2][name], p, q), name


def test_reference_mode_is_not_an_intersection(model, tmp_path):
    """An element of A's set is selected without being checked against B's set."""
    dense = [dense_scores(model, seed) for seed in (20, 21, 22)]
    files = [write_dense(model, tmp_path / f"s{i}.safetensors", d, keep=0.05) for i, d in enumerate(dense)]
    ref = select(read_scores(files[0]), [read_scores(f) for f in files[1:]], 0.0, 0.05, Mode.reference)
    paper = select(read_scores(files[0]), [read_scores(f) for f in files[1:]], 0.0, 0.05, Mode.paper)
    assert any(len(ref[n]) > len(paper[n]) for n in ref)


def test_zero_scores_shorten_reference_arrays(model, tmp_path):
    """Where zeros make one top set shorter, positions past its end are not selected."""
    dense = [dense_scores(model, seed) for seed in (30, 31, 32)]
    name = next(iter(dense[0]))
    dense[2][name][:] = 0
    dense[2][name][:3] = 1.0  # B keeps only 3 positive scores
    files = [write_dense(model, tmp_path / f"s{i}.safetensors", d, keep=0.05) for i, d in enumerate(dense)]
    got = select(read_scores(files[0]), [read_scores(f) for f in files[1:]], 0.0, 0.05, Mode.reference)
    assert len(got[name]) <= 3
    assert got[name].tolist() == brute_reference(dense[0][name], dense[1][name], dense[2][name], 0.0, 0.05)


def test_run_select_metadata(model, tmp_path):
    files = [write_dense(model, tmp_path / f"s{i}.safetensors", dense_scores(model, i), keep=0.05) for i in range(3)]
    sel, meta = run_select(SelectConfig(files[0], (files[1], files[2]), 0.01, 0.02, Mode.paper))
    assert meta["mode"] == "paper" and meta["fingerprint"] == read_scores(files[0]).meta["fingerprint"]
    assert len(meta["couple_sha256"]) == 2 and set(sel) == set(meta["shapes"])


def test_select_to_file_makes_missing_directories(model, tmp_path):
    from spinctl.io.formats import read_selection
    from spinctl.selection import select_to_file

    files = [write_dense(model, tmp_path / f"s{i}.safetensors", dense_scores(model, i), keep=0.05) for i in range(2)]
    out = tmp_path / "new" / "dir" / "sel.safetensors"
    summary = select_to_file(SelectConfig(files[0], (files[1],), 0.01, 0.02, Mode.paper), out)
    assert summary["file"] == str(out) and read_selection(out).meta["mode"] == "paper"


def test_reference_mode_needs_two_couples(tmp_path):
    with pytest.raises(SpinctlError, match="exactly two"):
        SelectConfig(tmp_path / "r", (tmp_path / "a",), 0.1, 0.1, Mode.reference)
