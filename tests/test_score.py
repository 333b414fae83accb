"""spinctl score: equality with the slow float64 reference, data rules, top-K rules, determinism, errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import score_reference as ref
from conftest import TEXTS
from pairdata import sha, write_csv

from spinctl.errors import InputError, SpinctlError, UnsupportedError
from spinctl.io.formats import keep_count, read_scores

KEEP = 1e-2  # ~100 entries per tiny tensor: a real top set, cheap to compare
REGEX = r"re:layers\.1\..*(q_proj|down_proj)"
_REF_CACHE: dict = {}


def pairs(n: int = 40) -> list[tuple[str, str]]:
    """Prompt/response rows of varied lengths, so batches need padding."""
    out = []
    for i, text in enumerate(TEXTS[:n]):
        words = text.split()
        cut = 2 + i % 5
        out.append((" ".join(words[:cut]), " " + " ".join(words[cut:] * (1 + i % 3))))
    return out


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "calib.csv", pairs())


def config(model, data, out, **kw):
    from spinctl.config import ScoreConfig

    opts = {"nsamples": 8, "keep": KEEP, "batch_size": 4, "targets": "all"} | kw
    return ScoreConfig(model=model, data=str(data), output=out, **opts)


def run(model, data, out, **kw) -> dict:
    from spinctl.scoring.engine import score

    return score(config(model, data, out, **kw))


def reference(model_dir: Path, data: Path, method: str, nsamples: int = 8) -> dict[str, np.ndarray]:
    key = (str(model_dir), method)
    if key not in _REF_CACHE:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = list(csv.DictReader(open(data, encoding="utf-8")))
        picked = np.random.default_rng(0).permutation(len(rows))[:nsamples]
        samples = [ref.encode(tok, rows[i]["prompt"], rows[i]["response"], 2048) for i in picked]
        model = ref.load_float64(model_dir)
        _REF_CACHE[key] = (ref.reference_snip if method == "snip" else ref.reference_wanda)(model, samples)
    return _REF_CACHE[key]


def wanted(names, targets: str) -> set[str]:
    if targets == "all":
        return set(names)
    if targets.startswith("re:"):
        return {n for n in names if re.search(targets[3:], n)}
    return {n for n in names if (".self_attn." in n) == (targets == "attn")}


def assert_topk_matches(idx: np.ndarray, scores: np.ndarray, full: np.ndarray, keep: float, name: str) -> None:
    """Same top set as the float64 reference (only elements tied with its k-th score, within
    fp32 noise, may swap), and each score within 1e-4 relative."""
    flat = full.reshape(-1)
    k = keep_count(keep, flat.size)
    expect = ref.reference_topk(full, k)
    assert len(idx) == len(expect), name
    kth = flat[expect[-1]]
    for i in set(idx.tolist()) ^ set(expect.tolist()):
        assert abs(flat[i] - kth) <= 1e-5 * kth, f"{name}: index {i} differs from the reference top set"
    np.testing.assert_allclose(scores, flat[idx], rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v carry biases, never scored
@pytest.mark.parametrize("method", ["snip", "wanda"])
@pytest.mark.parametrize("targets", ["mlp", "attn", "all", REGEX])
def test_matches_float64_reference(tiny_model, data_csv, tmp_path, arch, method, targets):
    model = tiny_model(arch=arch)
    out = tmp_path / "s.safetensors"
    summary = run(model, data_csv, out, method=method, targets=targets)
    full = reference(model, data_csv, method)
    sf = read_scores(out)
    assert set(sf.indices) == wanted(full, targets)
    assert summary["tensors"] == len(sf.indices) and summary["samples"] == 8 and summary["skipped"] == 0
    for name in sf.indices:
        assert sf.shapes[name] == list(full[name].shape)
        assert_topk_matches(sf.indices[name], sf.scores[name], full[name], KEEP, name)
    assert sf.meta["method"] == method and sf.meta["targets"] == targets and sf.meta["dtype"] == "float32"


def test_batch_size_does_not_change_sets(tiny_model, data_csv, tmp_path):
    model = tiny_model()
    run(model, data_csv, tmp_path / "1.safetensors", batch_size=1)
    run(model, data_csv, tmp_path / "4.safetensors", batch_size=4)
    one, four = read_scores(tmp_path / "1.safetensors"), read_scores(tmp_path / "4.safetensors")
    for name in one.indices:
        assert set(one.indices[name]) == set(four.indices[name]), name
        np.testing.assert_allclose(one.scores[name], four.scores[name], rtol=1e-5)


def test_deterministic_bytes(tiny_model, data_csv, tmp_path):
    model = tiny_model()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(model, data_csv, a, nsamples=12, keep=1e-3, targets="mlp", batch_size=None)
    run(model, data_csv, b, nsamples=12, keep=1e-3, targets="mlp", batch_size=None)
    assert a.read_bytes() == b.read_bytes()
    meta = read_scores(a).meta
    assert meta["nsamples"] == 12 and meta["dataset_rows"] == 40 and meta["keep"] == 1e-3
    import hashlib

    assert meta["dataset_sha256"] == hashlib.sha256(data_csv.read_bytes()).hexdigest()


def test_out_of_memory_halves_and_restarts(tiny_model, data_csv, tmp_path, monkeypatch):
    import torch

    import spinctl.scoring.engine as sc

    model = tiny_model()
    plain = tmp_path / "plain.safetensors"
    run(model, data_csv, plain, batch_size=4)
    real, calls = sc.run_pass, []

    def flaky(model_, acc, batches, pad_id, device, first, progress, *rest):  # rest: the loss scale
        calls.append(max(len(b) for b in batches))
        if len(calls) == 1:  # fail after some work: the accumulators must be reset
            real(model_, acc, batches[:1], pad_id, device, first, progress, *rest)
            raise torch.cuda.OutOfMemoryError("simulated")
        real(model_, acc, batches, pad_id, device, first, progress, *rest)

    monkeypatch.setattr(sc, "run_pass", flaky)
    monkeypatch.setattr(sc, "_plan", lambda *a: (4, None))  # as if auto had picked 4
    seen = []
    out = tmp_path / "retry.safetensors"
    summary = sc.score(config(model, data_csv, out, batch_size=None), progress=lambda n, total: seen.append(n))
    assert calls == [4, 2] and summary["batch_size"] == 2
    assert sum(seen) == 8 and seen[1] == -4  # the rewind after the failed first batch
    a, b = read_scores(plain), read_scores(out)
    for name in a.indices:
        assert set(a.indices[name]) == set(b.indices[name])


def test_topk_ranked_matches_kernel_with_ties_and_zeros():
    import torch

    from spinctl.scoring.engine import topk_ranked
    from spinctl_kernels import topk_indices

    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(1, 3000))
        levels = int(rng.integers(1, 6))
        x = (rng.integers(0, levels + 1, n) * rng.choice([0.5, 1.0])).astype(np.float32)  # many ties and zeros
        if trial % 3 == 0:
            x += (rng.random(n) < 0.5) * rng.random(n).astype(np.float32)
        for k in {0, 1, int(rng.integers(1, n + 1)), n, n + 5}:
            idx, sc = topk_ranked(torch.from_numpy(x), k)
            want = topk_indices(x, min(k, n))
            assert idx.dtype == np.int64 and sc.dtype == np.float32
            np.testing.assert_array_equal(idx, want)
            np.testing.assert_array_equal(sc, x[want])


def test_row_selection_and_tokenization(tiny_model, data_csv):
    from transformers import AutoTokenizer

    from spinctl.scoring.data import load_calibration, select_rows, tokenize

    np.testing.assert_array_equal(select_rows(1000, 128, 3), np.random.default_rng(3).permutation(1000)[:128])
    tok = AutoTokenizer.from_pretrained(tiny_model())
    cal = load_calibration(data_csv, tok, nsamples=10, seed=5, max_length=2048)
    assert [s.row for s in cal.samples] == list(np.random.default_rng(5).permutation(40)[:10])
    rows = pairs()
    for s in cal.samples:
        p, r = rows[s.row]
        assert list(s.ids) == tok(p)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
        assert s.n_prompt == len(tok(p)["input_ids"]) and s.ids[0] == tok.bos_token_id
    n_cut = 7
    ((ids, n),) = tokenize(tok, [rows[0][0]], [rows[0][1]], max_length=n_cut)
    full, _ = ref.encode(tok, rows[0][0], rows[0][1], 2048)
    assert ids == full[:n_cut] and n == min(len(tok(rows[0][0])["input_ids"]), n_cut)  # the end is cut


def test_truncation_skips_samples_without_response(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model = tiny_model()
    tok = AutoTokenizer.from_pretrained(model)
    rows = [("a b c d e f g h i j k l m n o p", " short answer")] * 3 + [("hi", " there is an answer here")] * 5
    data = write_csv(tmp_path / "d.csv", rows)
    long_prompt = len(tok(rows[0][0])["input_ids"])
    summary = run(model, data, tmp_path / "s.safetensors", nsamples=8, max_length=long_prompt, method="wanda")
    assert summary["skipped"] == 3 and summary["samples"] == 5
    assert read_scores(tmp_path / "s.safetensors").meta["skipped"] == 3
    with pytest.raises(InputError, match="e.csv: all 3 selected samples have no response tokens"):
        run(
            model,
            write_csv(tmp_path / "e.csv", rows[:3]),
            tmp_path / "t.safetensors",
            nsamples=3,
            max_length=long_prompt,
        )


def test_chat_template(tiny_model, data_csv, tmp_path):
    from transformers import AutoTokenizer

    from spinctl.scoring.data import tokenize

    model = tiny_model()
    tok = AutoTokenizer.from_pretrained(model)
    ((ids, n),) = tokenize(tok, ["where is it?"], [" here"], 2048, chat_template=True)
    prompt = tok("<s>user: where is it?\nassistant: ", add_special_tokens=False)["input_ids"]
    assert ids == prompt + tok(" here", add_special_tokens=False)["input_ids"] and n == len(prompt)
    run(model, data_csv, tmp_path / "c.safetensors", method="wanda", chat_template=True)
    assert read_scores(tmp_path / "c.safetensors").meta["chat_template"] is True
    tok.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        tokenize(tok, ["x"], ["y"], 2048, chat_template=True)


def test_jsonl_and_builtin(tiny_model, tmp_path):
    from spinctl.scoring.data import read_rows, resolve

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": p, "a": r, "id": i}) for i, (p, r) in enumerate(pairs(12))) + "\n")
    rows = read_rows(path, "q", "a")
    assert rows.count == 12 and rows.prompts[3] == pairs(12)[3][0]
    assert resolve("builtin:fairness").name == "fairness.jsonl"
    with pytest.raises(InputError, match="builtin:nope.*builtin:fairness"):
        resolve("builtin:nope")
    out = tmp_path / "j.safetensors"
    summary = run(tiny_model(), path, out, method="wanda", prompt_column="q", response_column="a")
    # The same rows as a prompt/response CSV draw the same samples: the same scores, and the same
    # metadata but for the data file's hash. Any other column read as prompt or response differs.
    csv_summary = run(
        tiny_model(), write_csv(tmp_path / "d.csv", pairs(12)), tmp_path / "c.safetensors", method="wanda"
    )
    assert summary["samples"] == csv_summary["samples"] == 8 and summary["tokens"] == csv_summary["tokens"]
    got, want = read_scores(out), read_scores(tmp_path / "c.safetensors")
    assert got.meta["dataset_rows"] == 12 and got.meta["dataset_sha256"] == sha(path)
    assert {k: v for k, v in got.meta.items() if k != "dataset_sha256"} == {
        k: v for k, v in want.meta.items() if k != "dataset_sha256"
    }
    assert set(got.indices) == set(want.indices) and got.indices
    for name in want.indices:
        np.testing.assert_array_equal(got.indices[name], want.indices[name], err_msg=name)
        np.testing.assert_array_equal(got.scores[name], want.scores[name], err_msg=name)


def test_bad_inputs(tiny_model, data_csv, tmp_path):
    from spinctl.config import ScoreConfig

    model = tiny_model()
    out = tmp_path / "s.safetensors"
    cases = [
        (lambda: run(tmp_path / "nomodel", data_csv, out), "nomodel"),
        (lambda: run(model, tmp_path / "nodata.csv", out), "nodata.csv"),
        (
            lambda: run(model, write_csv(tmp_path / "cols.csv", pairs(4), ("question", "answer")), out),
            r"cols.csv.*'prompt'.*'question', 'answer'",
        ),
        (lambda: run(model, write_csv(tmp_path / "empty.csv", []), out), "empty.csv: has no data rows"),
        (
            lambda: run(model, (tmp_path / "zero.csv").write_bytes(b"") or tmp_path / "zero.csv", out),
            "zero.csv: has no data rows",
        ),
        (lambda: run(model, data_csv, out, nsamples=41), "calib.csv: has 40 rows"),
        (lambda: run(model, data_csv, out, targets="re:(("), "invalid regular expression"),
        (lambda: run(model, data_csv, out, targets="re:no_such_layer"), "matches no Linear weight.*model"),
        (lambda: ScoreConfig(model=model, data=str(data_csv), output=out, keep=0), "--keep"),
        (lambda: ScoreConfig(model=model, data=str(data_csv), output=out, nsamples=0), "--nsamples"),
        (lambda: ScoreConfig(model=model, data=str(data_csv), output=out, method="magnitude"), "--method"),
        (lambda: run(model, data_csv, tmp_path), "is a directory"),
        (lambda: run(model, data_csv, model / "model.safetensors"), "is an input of this command"),
        (lambda: run(model, data_csv, model / "config.json"), "config.json: is a file of the model directory"),
        (lambda: run(model, data_csv, linked), "linked.csv: is an input of this command .*calib.csv"),
        (lambda: run(model, data_csv, data_csv / "s.safetensors"), "calib.csv is not a directory"),
        (lambda: run(model, data_csv, notes), "notes.txt: exists and is not a spinctl scores file"),
    ]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a score file: -o must not replace it")
    linked = tmp_path / "linked.csv"
    os.link(data_csv, linked)  # a second name of the data file: writing there would replace the data
    config = (model / "config.json").read_bytes()
    for call, pattern in cases:
        with pytest.raises(SpinctlError, match=pattern):
            call()
    assert not out.exists() and (model / "config.json").read_bytes() == config and notes.read_text().startswith("not")


def test_renamed_checkpoint_tensor_is_refused(tiny_model, model_copy, data_csv, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = model_copy(tiny_model())
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.kernel"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedError, match="lacks 1 weight.*model.layers.0.mlp.up_proj.weight"):
        run(model, data_csv, tmp_path / "s.safetensors", targets="mlp")
    # A model whose module names differ from the checkpoint's tensor names is refused too.
    from spinctl.runtime import load_model
    from spinctl.scoring.engine import score

    loaded = load_model(tiny_model())
    with pytest.raises(UnsupportedError, match=r"weight model.layers.0.mlp.up_proj.weight \[160, 64\] is missing"):
        score(config(model, data_csv, tmp_path / "s.safetensors", targets="mlp"), loaded=loaded)


def test_load_moves_the_model_to_the_device(tiny_model, data_csv, tmp_path, monkeypatch):
    """Loaded on the host, then moved, with no device_map (transformers serves one only with
    `accelerate` installed); the meta device stands in for a GPU. A model too large for the
    device fails in one line that points to --stream."""
    import torch

    import spinctl.runtime as rt

    monkeypatch.setattr(rt, "resolve_device", lambda device: torch.device("meta"))
    loaded = rt.load_model(tiny_model())
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}

    def full(self, *a, **kw):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(torch.nn.Module, "to", full)
    with pytest.raises(SpinctlError, match="does not fit in the memory of meta; score it with --stream"):
        rt.load_model(tiny_model())


def test_import_is_light():
    code = "import sys, spinctl.scoring.engine, spinctl.scoring.data, spinctl.scoring.methods, spinctl.scoring.targets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_device_path_runs_tiny(tmp_path, bench_data):
    """The --shape llama2-7b code path (build on the device, in-process scoring, reference on 8
    samples), at toy size on whatever device is here: the GPU run gets one shot."""
    import torch

    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_score.py"),
        "--shape",
        "tiny",
        "--rows",
        "16",
        "--workdir",
        str(tmp_path),
        "--data",
        str(bench_data / "fairness.csv"),
        "--data-dir",
        str(bench_data),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [line["what"] for line in lines] == [
        "build",
        "spinctl_snip_8",
        "spinctl_snip",
        "spinctl_snip_twice",
        "spinctl_wanda",
        "reference_loop_8",
    ]
    snip = lines[2]
    assert snip["summary"]["samples"] == 16
    # fraction_of_peak = 6 · tokens · scored weights / pass seconds / the H200's 790 dense bf16
    # TFLOPS, the scored weights being the MLP's: layers · 3 · hidden · intermediate of --shape tiny.
    assert snip["scored_params"] == 2 * 3 * 64 * 172
    assert snip["pass_seconds"] == snip["summary"]["pass_seconds"] > 0
    tflops = 6 * snip["summary"]["tokens"] * snip["scored_params"] / snip["pass_seconds"] / 1e12
    assert snip["tflops"] == round(tflops, 1) and snip["fraction_of_peak"] == round(tflops / 790.0, 3)
    assert 0 < tflops <= 790.0  # no device beats its peak: a faster pass means a mismeasured time
    assert lines[-1]["topk_overlap_mean"] >= 0.95
    if not torch.cuda.is_available():  # CUDA's attention backward is not deterministic: gpu_check reports it
        assert lines[3]["byte_identical"] is True


def test_benchmark_cpu_path_runs_tiny(tmp_path, bench_data):
    """bench_score's CPU flow at toy size: spinctl (library and CLI, same bytes) and the three
    baselines from one run, each baseline's top-K sets compared with spinctl's file."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_score.py"), "--shape", "cpu", "--workdir", str(tmp_path)]
    cmd += ["--layers", "2", "--hidden", "64", "--intermediate", "172", "--heads", "4", "--rows", "6", "--repeat", "1"]
    cmd += ["--data", str(bench_data / "fairness.csv"), "--data-dir", str(bench_data), "--keep", "0.05"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {line["what"]: line for line in map(json.loads, res.stdout.splitlines())}
    assert list(lines) == [
        "spinctl_library",
        "spinctl_cli",
        "reference_loop",
        "per_sample_loop",
        "training_step",
        "ratio",
    ]
    cli = lines["spinctl_cli"]  # another process: the same bits but for rare last-place flips (docs/design.md §13)
    assert cli["same_bytes"] or (cli["same_topk"] and cli["max_rel_score_diff"] <= 1e-6), cli
    # the per-sample loop is the independent fp64 reference: the same top-K sets
    assert lines["per_sample_loop"]["topk_overlap_min"] == 1.0
    assert lines["reference_loop"]["topk_overlap_min"] >= 0.95  # per-sample |grad| summed in fp32
    assert all(v > 0 for k, v in lines["ratio"].items() if k.endswith(("_spinctl", "_pass")))


def test_wanda_stops_after_the_last_scored_layer(tiny_model, data_csv, tmp_path, monkeypatch):
    """wanda's forward runs no layer above the highest scored one (and no lm_head), with the
    same scores for that layer as when every layer runs."""
    import torch

    import spinctl.runtime as rt
    from spinctl.io.formats import read_scores

    model = tiny_model()
    calls = []
    real_load = rt.load_model

    def counted(*a, **k):
        loaded = real_load(*a, **k)
        for i, layer in enumerate(loaded.model.model.layers):
            layer.register_forward_hook(lambda m, args, out, i=i: calls.append(i))
        loaded.model.lm_head.register_forward_hook(lambda *args: calls.append("head"))
        return loaded

    monkeypatch.setattr("spinctl.scoring.engine.load_model", counted)
    low, full = tmp_path / "low.safetensors", tmp_path / "full.safetensors"
    run(model, data_csv, low, method="wanda", targets=r"re:layers\.0\.")
    assert calls and set(calls) == {0}
    run(model, data_csv, full, method="wanda")
    a, b = read_scores(low), read_scores(full)
    for name in a.indices:
        assert torch.equal(torch.as_tensor(a.scores[name]), torch.as_tensor(b.scores[name]))
