"""Issue 11 item 12: an option value out of range exits 2 like any other usage error, one line naming the option.

Checked before any file is read: the paths below need not exist.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from clirun import cli

SCORE = ["score", "no-model", "builtin:general", "-o", "s.safetensors"]
SELECT = ["select", "--retain", "r.safetensors", "--couple", "c.safetensors", "-o", "sel.safetensors"]
PATCH = ["patch", "no-model", "out", "--retain", "r.safetensors", "--couple", "c.safetensors"]
EVAL = ["eval", "no-model", "--prompts", "builtin:eval_prompts"]
PPL = ["ppl", "no-model", "no-text.txt"]
EVAL_PAIRS = ["eval", "no-model", "--pairs", "s.csv", "u.csv"]
SWEEP = ["sweep", "no-model", "--retain", "r.safetensors", "--couple", "c.safetensors", "--pairs", "s.csv", "u.csv"]
SWEEP += ["--ppl-data", "t.txt", "--p", "0.1", "--q", "0.1"]

CASES = {
    "select_p_2": (SELECT + ["--p", "2"], "--p"),
    "select_q_negative": (SELECT + ["--q", "-0.1"], "--q"),
    "select_p_nan": (SELECT + ["--p", "nan"], "--p"),
    "patch_q_2": (PATCH + ["--q", "2"], "--q"),
    "score_nsamples_0": (SCORE + ["--nsamples", "0"], "--nsamples"),
    "score_seed_negative": (SCORE + ["--seed", "-1"], "--seed"),
    "score_device_tpu": (SCORE + ["--device", "tpu"], "--device"),
    "score_keep_0": (SCORE + ["--keep", "0"], "--keep"),
    "score_keep_2": (SCORE + ["--keep", "2"], "--keep"),
    "score_max_length_1": (SCORE + ["--max-length", "1"], "--max-length"),
    "score_batch_size_0": (SCORE + ["--batch-size", "0"], "--batch-size"),
    "score_dtype_int8": (SCORE + ["--dtype", "int8"], "--dtype"),
    "score_targets_bad_regex": (SCORE + ["--targets", "re:("], "--targets"),
    "eval_limit_0": (EVAL + ["--limit", "0"], "--limit"),
    "eval_max_new_tokens_0": (EVAL + ["--max-new-tokens", "0"], "--max-new-tokens"),
    "eval_batch_size_0": (EVAL + ["--batch-size", "0"], "--batch-size"),
    "eval_device_tpu": (EVAL + ["--device", "tpu"], "--device"),
    "eval_dtype_int8": (EVAL + ["--dtype", "int8"], "--dtype"),
    "ppl_seqlen_1": (PPL + ["--seqlen", "1"], "--seqlen"),
    "ppl_device_tpu": (PPL + ["--device", "tpu"], "--device"),
    "ppl_rows_0": (PPL + ["--rows", "0"], "--rows"),  # once exit 1, naming sweep's --ppl-rows
    "ppl_max_length_negative": (PPL + ["--max-length", "-3"], "--max-length"),  # once accepted
    "eval_pairs_limit_0": (EVAL_PAIRS + ["--pairs-limit", "0"], "--pairs-limit"),
    "eval_resamples_0": (EVAL_PAIRS + ["--resamples", "0"], "--resamples"),
    "sweep_resamples_0": (SWEEP + ["--resamples", "0"], "--resamples"),  # once a traceback after the whole sweep
    "sweep_max_length_negative": (SWEEP + ["--max-length", "-3"], "--max-length"),  # once accepted
    "sweep_p_2": (SWEEP[:-4] + ["--p", "2", "--q", "0.1"], "--p"),
    "sweep_mode_bogus": (SWEEP + ["--mode", "bogus"], "--mode"),
    "score_max_memory_400_digits": (SCORE + ["--max-memory", "1" + "0" * 400], "--max-memory"),  # float inf
    "score_max_memory_past_int64": (SCORE + ["--max-memory", "9" * 30 + "TB"], "--max-memory"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All cases' CLI processes at once: each is mostly interpreter start-up."""
    tmp = tmp_path_factory.mktemp("usage")
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(cli, *argv, cwd=tmp) for name, (argv, _) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}, tmp


@pytest.mark.parametrize("name", sorted(CASES))
def test_out_of_range_is_a_usage_error(results, name):
    runs, tmp = results
    r, option = runs[name], CASES[name][1]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert option in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(tmp.iterdir()), "nothing may be written"
