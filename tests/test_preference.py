"""Judge-free awareness: response NLL against a one-sample HF reference, pairing rules, exclusions, `eval --pairs`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from clirun import cli
from pairdata import PROMPTS, SAFE, UNSAFE, score_file, write_csv

from spinctl.errors import SpinctlError
from spinctl.evaluation.heldout import heldout_rows, read_calibrated
from spinctl.evaluation.preference import PreferenceConfig, load_pairs, preference_stats, run_preference


@pytest.fixture
def pair_files(tmp_path):
    """safe/unsafe CSVs: 8 shared prompts (one with identical responses), duplicates, and one-sided prompts."""
    safe_rows = list(zip(PROMPTS, SAFE)) + [(PROMPTS[0], "A later, different safe answer."), ("Only in safe?", "yes")]
    unsafe_rows = [("Only in unsafe?", "no")] + list(zip(PROMPTS, UNSAFE)) + [(PROMPTS[1], "Later unsafe answer.")]
    return write_csv(tmp_path / "set_safe.csv", safe_rows), write_csv(tmp_path / "set_unsafe.csv", unsafe_rows)


# ---------------------------------------------------------------- NLL against the slow reference


def reference_nll(model_dir: Path, prompts, responses) -> list[float]:
    """One sample at a time, plain torch + HF's own loss: labels -100 on the chat-template prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        pytest.fail("fixture model lacks a chat template")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p, r in zip(prompts, responses):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        r_ids = tok(r, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        labels = ids.clone()
        labels[0, : len(p_ids)] = -100
        with torch.no_grad():
            out.append(float(model(input_ids=ids, labels=labels).loss))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_response_nll_matches_one_sample_reference(tiny_model, arch):
    from spinctl.evaluation.evaluate import load_causal_lm
    from spinctl.evaluation.nll import response_nll

    model_dir = tiny_model(arch)
    prompts, responses = PROMPTS + PROMPTS[:3], SAFE + UNSAFE[:3]
    ref = reference_nll(model_dir, prompts, responses)
    model, tok = load_causal_lm(model_dir, "cpu", "float32")
    for bs in (1, 3, 16):
        got = response_nll(model, tok, prompts, responses, batch_size=bs)
        np.testing.assert_allclose(got.mean, ref, rtol=2e-5)
        assert (got.tokens == [len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses]).all()
    # Deterministic: the same call twice is bit-equal.
    a = response_nll(model, tok, prompts, responses, batch_size=3).mean
    b = response_nll(model, tok, prompts, responses, batch_size=3).mean
    assert a.tobytes() == b.tobytes()


def test_response_nll_template_added_when_missing(tmp_path):
    """A model saved without a chat template: give it one (as a user would) and the reference still agrees."""
    from conftest import TEXTS

    from spinctl.demo.tiny_models import CHAT_TEMPLATE, build_tiny_model
    from spinctl.evaluation.evaluate import load_causal_lm
    from spinctl.evaluation.nll import response_nll

    model_dir = build_tiny_model(tmp_path / "m", TEXTS, layers=1, hidden=32)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    model, tok = load_causal_lm(model_dir, "cpu", "float32")
    assert not tok.chat_template
    with pytest.raises(SpinctlError, match="no chat template"):
        response_nll(model, tok, PROMPTS[:2], SAFE[:2])
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    model, tok = load_causal_lm(model_dir, "cpu", "float32")
    np.testing.assert_allclose(
        response_nll(model, tok, PROMPTS, SAFE, batch_size=4).mean, reference_nll(model_dir, PROMPTS, SAFE), rtol=2e-5
    )


def test_empty_response_is_an_error(tiny_model):
    from spinctl.evaluation.evaluate import load_causal_lm
    from spinctl.evaluation.nll import response_nll

    model, tok = load_causal_lm(tiny_model(), "cpu", "float32")
    with pytest.raises(SpinctlError, match="sample 2 .*no response token"):
        response_nll(model, tok, PROMPTS[:2], ["fine", ""])


# ---------------------------------------------------------------- statistics (pure)


def test_preference_stats_against_loops():
    rng = np.random.default_rng(5)
    safe, unsafe = rng.normal(2, 1, 60), rng.normal(2.3, 1, 60)
    safe[3] = unsafe[3]  # a tie is not a preference
    st = preference_stats(safe, unsafe)
    correct = [s < u for s, u in zip(safe, unsafe)]
    assert st["n"] == 60 and st["accuracy"] == sum(correct) / 60
    assert st["margin"] == pytest.approx(sum(u - s for s, u in zip(safe, unsafe)) / 60, rel=1e-12)
    # The bootstrap: a percentile interval around the accuracy, about ±1.96·sqrt(a(1-a)/n) wide, seeded.
    acc = st["accuracy"]
    assert st["ci_low"] <= acc <= st["ci_high"]
    half = 1.96 * math.sqrt(acc * (1 - acc) / 60)
    assert st["ci_high"] - st["ci_low"] == pytest.approx(2 * half, rel=0.2)
    assert preference_stats(safe, unsafe) == st
    # A slow reference of the same draws: row b of the draw matrix is resample b.
    draws = np.random.default_rng(0).integers(0, 60, size=(2000, 60))
    boots = sorted(sum(correct[i] for i in row) / 60 for row in draws)
    assert st["ci_low"] == pytest.approx(np.percentile(boots, 2.5)) and st["ci_high"] == pytest.approx(
        np.percentile(boots, 97.5)
    )


# ---------------------------------------------------------------- pairing and exclusions


def test_pairs_first_rows_identical_dropped(pair_files):
    ps = load_pairs(*pair_files)
    assert ps.name == "set" and ps.shared == 8 and ps.identical == 1 and ps.excluded == 0 and ps.n == 7
    assert PROMPTS[3] not in ps.prompts  # identical responses: no preference possible
    assert list(ps.prompts) == [p for p in PROMPTS if p != PROMPTS[3]]  # order of first rows in SAFE
    i0, i1 = ps.prompts.index(PROMPTS[0]), ps.prompts.index(PROMPTS[1])
    assert ps.safe_responses[i0] == SAFE[0] and ps.unsafe_responses[i1] == UNSAFE[1]  # first rows win
    short = load_pairs(*pair_files, limit=3)  # --pairs-limit: the first pairs, counts of the whole files
    assert short.prompts == ps.prompts[:3] and (short.shared, short.identical) == (8, 1)


def test_exclude_drops_calibration_prompts(pair_files, tiny_model, tmp_path):
    safe, unsafe = pair_files
    sf = score_file(tiny_model(), tmp_path / "s.safetensors", safe, nsamples=4, seed=3)
    cal = read_calibrated(sf)
    picked = np.random.default_rng(3).permutation(10)[:4]
    safe_prompts = [r[0] for r in list(csv.reader(open(safe)))[1:]]
    dropped = {safe_prompts[i] for i in picked}
    ps = load_pairs(safe, unsafe, [cal])
    assert not dropped & set(ps.prompts)
    assert set(ps.prompts) == set(PROMPTS) - dropped - {PROMPTS[3]}
    assert ps.excluded == len((set(PROMPTS) - {PROMPTS[3]}) & dropped)
    # A score file from another data file drops nothing.
    other = write_csv(tmp_path / "other.csv", [("x", "y")] * 10)
    assert (
        load_pairs(safe, unsafe, [read_calibrated(score_file(tiny_model(), tmp_path / "o.safetensors", other, 4))]).n
        == 7
    )
    # Held-out rows of a file: every row not picked.
    from spinctl.scoring.data import read_rows

    assert list(heldout_rows(read_rows(safe), [cal])) == sorted(set(range(10)) - set(picked.tolist()))


@pytest.mark.parametrize("case", ["missing_column", "no_shared", "same_file", "all_excluded", "exclude_other"])
def test_bad_pairs_are_one_line_errors(case, pair_files, tiny_model, tmp_path):
    safe, unsafe = pair_files
    exclude = ()
    if case == "missing_column":
        unsafe = write_csv(tmp_path / "bad.csv", [("a", "b")], header=("question", "response"))
    elif case == "no_shared":
        unsafe = write_csv(tmp_path / "u2.csv", [("nothing shared", "x")])
    elif case == "same_file":
        unsafe = safe
    elif case == "all_excluded":
        exclude = (score_file(tiny_model(), tmp_path / "s.safetensors", safe, nsamples=10),)
    else:
        other = write_csv(tmp_path / "other.csv", [("x", "y")] * 10)
        exclude = (score_file(tiny_model(), tmp_path / "o.safetensors", other, nsamples=4),)
    expect = {
        "missing_column": "no column 'prompt'",
        "no_shared": "share no prompt",
        "same_file": "same data twice",
        "all_excluded": "used for calibration",
        "exclude_other": "would drop nothing",
    }[case]
    with pytest.raises(SpinctlError, match=expect):
        run_preference(PreferenceConfig(tiny_model(), ((safe, unsafe),), exclude, device="cpu"))
    r = cli("eval", tiny_model(), "--pairs", safe, unsafe, *[a for e in exclude for a in ("--exclude", e)])
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and expect in r.stderr, r.stderr


def test_eval_pairs_cli(pair_files, tiny_model, tmp_path):
    safe, unsafe = pair_files
    model = tiny_model()
    other_safe = write_csv(tmp_path / "b_safe.csv", list(zip(PROMPTS[:5], SAFE[:5])))
    other_unsafe = write_csv(tmp_path / "b_unsafe.csv", list(zip(PROMPTS[:5], UNSAFE[:5])))
    sf = score_file(model, tmp_path / "s.safetensors", safe, nsamples=3)
    r = cli(
        "eval",
        model,
        "--pairs",
        safe,
        unsafe,
        "--pairs",
        other_safe,
        other_unsafe,
        "--exclude",
        sf,
        "--batch-size",
        "3",
        "--device",
        "cpu",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    out = json.loads(r.stdout)
    a, b = out["pair_sets"]
    assert (a["name"], b["name"]) == ("set", "b")
    assert a["n"] + a["identical"] + a["excluded"] == a["shared"] == 8 and a["excluded"] >= 1
    assert b["n"] == 4 and b["excluded"] == 0
    for s in (a, b):
        assert 0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1 and math.isfinite(s["margin"])
    # The library gives the same numbers (same batching), and so does a second run.
    lib = run_preference(
        PreferenceConfig(model, ((safe, unsafe), (other_safe, other_unsafe)), (sf,), batch_size=3, device="cpu")
    )
    for x, y in zip(lib["pair_sets"], out["pair_sets"]):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
    r = cli("eval", model, "--pairs", safe, unsafe, "--device", "cpu")  # human table
    assert r.returncode == 0 and "preference accuracy" in r.stdout
    assert cli("eval", model, "--pairs", safe).returncode == 2  # one file: usage error
    assert cli("eval", model).returncode == 2  # neither --prompts nor --pairs
