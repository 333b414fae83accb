"""Data-parallel scoring: sharding balance, bucketed all-reduce and failure exchange on 2 gloo ranks,
and `torchrun -m spinctl score` on 2 CPU ranks equal to one process (snip, wanda, --stream)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_run import YAML as RUN_YAML  # the same tiny pipeline as the single-process test
from test_score import pairs, write_csv

from spinctl.io.formats import read_scores
from spinctl.scoring import distributed

ROOT = Path(__file__).resolve().parents[1]
KEEP = 1e-2
TIMEOUT_S = "60"  # a protocol bug fails the test in a minute instead of hanging for 30


# ---- sharding -------------------------------------------------------------------------------


def test_shard_plan_balances_tokens():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(0, 300))
        world = int(rng.integers(1, 17))
        lengths = rng.integers(1, 2048 if trial % 2 else 20, n).tolist()  # wide, and narrow with many ties
        owner = distributed.shard_plan(lengths, world)
        assert owner == distributed.shard_plan(lengths, world)  # deterministic
        assert len(owner) == n and all(0 <= r < world for r in owner)
        loads = [sum(length for length, r in zip(lengths, owner) if r == rank) for rank in range(world)]
        assert sum(loads) == sum(lengths)
        assert max(loads) - min(loads) <= max(lengths, default=0), (trial, loads)


def test_shard_samples_partitions_in_order():
    from spinctl.scoring.data import Sample

    samples = [Sample(i, tuple(range(3 + (i * 7) % 11)), 1) for i in range(23)]
    shares = [distributed.shard_samples(samples, distributed.DistContext(r, 3, r)) for r in range(3)]
    assert sorted(s.row for share in shares for s in share) == list(range(23))  # each sample exactly once
    assert all([s.row for s in share] == sorted(s.row for s in share) for share in shares)  # original order kept
    assert distributed.shard_samples(samples, distributed.DistContext()) is samples
    assert distributed.shard_samples(samples[:1], distributed.DistContext(1, 2, 1)) == []  # more ranks than samples


def test_buckets_are_bounded():
    import torch

    tensors = {
        f"t{i:02d}": torch.zeros(n, dtype=torch.float32 if i % 3 else torch.float64)
        for i, n in enumerate([10, 300, 5, 2000, 64, 64, 64, 1, 900, 0, 256, 3000])
    }
    plan = distributed._buckets(tensors, bucket_bytes=2048)
    assert sorted(n for group in plan for n in group) == sorted(tensors)
    for group in plan:
        sizes = [tensors[n].numel() * tensors[n].element_size() for n in group]
        assert len(group) == 1 or sum(sizes) <= 2048, group
        assert len({tensors[n].dtype for n in group}) == 1, group
    assert ["t03"] in plan and ["t11"] in plan  # 8000 and 12000 bytes: alone, reduced in place


def test_single_process_is_a_no_op():
    import torch

    ctx = distributed.context()
    assert not ctx.enabled and ctx.is_main and distributed.is_main_process()
    t = {"a": torch.ones(3)}
    distributed.all_reduce_(t, ctx)
    assert t["a"].tolist() == [1.0, 1.0, 1.0]
    assert distributed.exchange(ctx, x=1) == [{"x": 1}]
    with distributed.session() as s:
        assert s == ctx


def test_import_is_light():
    code = "import sys, spinctl.scoring.distributed, spinctl.run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- two gloo ranks in processes of our own ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    """Spawn target: joins as `rank` through the same env:// variables torchrun sets, runs a
    scenario, writes what happened to out/rank.json (the test reads that, not exit codes)."""
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    os.environ[distributed.TIMEOUT_ENV] = TIMEOUT_S
    result: dict = {}
    try:
        globals()[f"_scenario_{scenario}"](rank, world, result)
    except BaseException as e:  # noqa: BLE001 (recorded for the test to judge)
        result["raised"] = type(e).__name__
        result["message"] = str(e)
    result["failure_reported"] = distributed.failure_reported()
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def _tensors(rank: int) -> dict:
    """Each rank's accumulators: one large tensor (reduced in place) and small ones of two dtypes (packed)."""
    import torch

    g = torch.Generator().manual_seed(rank)
    return {
        "big": torch.rand(3000, generator=g),
        "b": torch.rand(7, 5, generator=g),
        "a": torch.rand(100, generator=g),
        "c": torch.rand(40, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0),
    }


def _scenario_reduce(rank, world, result):
    t = _tensors(rank)
    with distributed.session() as ctx:
        assert ctx.enabled and ctx.rank == rank and ctx.world_size == world
        distributed.all_reduce_(t, ctx, bucket_bytes=4096)
        result["facts"] = distributed.exchange(ctx, rank=rank, hello="x" * rank)
        result["held"] = len(distributed._State.held)  # the last exchange's tensors outlive it...
    result["held_after"] = len(distributed._State.held)  # ...until the group is gone (see _State)
    want = {k: sum(_tensors(r)[k] for r in range(world)) for k in t}
    result["max_error"] = max(float((t[k] - want[k]).abs().max()) if t[k].numel() else 0.0 for k in t)
    result["dtypes"] = {k: str(v.dtype) for k, v in t.items()}


def _scenario_rank1_fails_early(rank, world, result):
    """Rank 1 fails before any collective; rank 0 goes on to the all-reduce and must hear of it there."""
    from spinctl.errors import InputError

    with distributed.session() as ctx:
        if rank == 1:
            raise InputError("calib.csv: has 3 rows, fewer than --nsamples 8 (seen on rank 1 only)")
        distributed.all_reduce_(_tensors(rank), ctx)
        result["reduced"] = True


def _scenario_rank0_fails_late(rank, world, result):
    """Rank 0 fails after the last collective (say, writing the file); the others hear of it on leaving."""
    with distributed.session() as ctx:
        distributed.all_reduce_(_tensors(rank), ctx)
        if rank == 0:
            raise OSError(28, "No space left on device", "/out/scores.safetensors")
    result["left"] = True


def _scenario_disagree(rank, world, result):
    with distributed.session() as ctx:
        distributed.agree(ctx, " (data or model)", data_sha256="ab" if rank == 0 else "cd", model_fingerprint="same")


def _spawn(scenario: str, tmp_path: Path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path / scenario
    out.mkdir()
    mp.spawn(_worker, args=(world, _free_port(), scenario, str(out)), nprocs=world, join=True)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(world)]


def test_bucketed_all_reduce_and_exchange_on_two_ranks(tmp_path):
    results = _spawn("reduce", tmp_path)
    for r in results:
        assert "raised" not in r, r
        assert r["max_error"] <= 1e-6
        assert r["dtypes"]["c"] == "torch.float64"
        assert r["facts"] == [{"rank": 0, "hello": ""}, {"rank": 1, "hello": "x"}]
        assert r["held"] == 2 and r["held_after"] == 0
        assert not r["failure_reported"]


def test_failure_on_one_rank_reaches_rank0(tmp_path):
    r0, r1 = _spawn("rank1_fails_early", tmp_path)
    assert r1["raised"] == "InputError" and r1["failure_reported"]  # its own error, and rank 0 has it
    assert r0["raised"] == "RankFailed" and "reduced" not in r0
    assert r0["message"] == "rank 1: calib.csv: has 3 rows, fewer than --nsamples 8 (seen on rank 1 only)"

    r0, r1 = _spawn("rank0_fails_late", tmp_path)
    assert r0["raised"] == "OSError" and r0["failure_reported"]
    assert r1["raised"] == "RankFailed" and "left" not in r1
    assert r1["message"] == "rank 0: /out/scores.safetensors: No space left on device"


def test_ranks_that_disagree_fail_alike(tmp_path):
    for r in _spawn("disagree", tmp_path):
        assert r["raised"] == "InputError"
        assert r["message"].startswith("rank 1: data_sha256 'cd' differs from rank 0's 'ab' (data or model)")


# ---- torchrun -m spinctl on two CPU ranks -------------------------------------------------------


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "calib.csv", pairs())


def _env() -> dict:
    # The tree under test first; one thread per rank (2 ranks share this machine's cores).
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        distributed.TIMEOUT_ENV: TIMEOUT_S,
    }


def torchrun(*args, nproc: int = 2, script: Path | None = None) -> subprocess.CompletedProcess:
    entry = [str(script)] if script else ["-m", "spinctl"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *entry,
        *map(str, args),
    ]
    # Its own session: a hung run is killed with its ranks, which would otherwise outlive the test.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_same_scores(a: Path, b: Path) -> None:
    """Same top-K set per tensor, and scores within 1e-5 relative (sums in another order)."""
    one, two = read_scores(a), read_scores(b)
    assert one.shapes == two.shapes and set(one.indices) == set(two.indices)
    assert {k: v for k, v in one.meta.items() if k != "version"} == {
        k: v for k, v in two.meta.items() if k != "version"
    }
    for name in one.indices:
        ia, ib = np.argsort(one.indices[name]), np.argsort(two.indices[name])
        np.testing.assert_array_equal(one.indices[name][ia], two.indices[name][ib], err_msg=name)
        np.testing.assert_allclose(two.scores[name][ib], one.scores[name][ia], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("method,stream", [("snip", False), ("wanda", False), ("snip", True), ("wanda", True)])
def test_two_ranks_equal_one_process(tiny_model, calib, tmp_path, method, stream):
    from spinctl.config import ScoreConfig
    from spinctl.scoring.engine import score

    if stream:  # --stream is part of spinctl: a broken import fails here, in this process, not in a rank
        import spinctl.scoring.layerwise  # noqa: F401
    model = tiny_model()
    opts = dict(nsamples=12, keep=KEEP, targets="all", method=method, device="cpu", batch_size=4)
    one = tmp_path / "one.safetensors"
    summary = score(ScoreConfig(model=model, data=str(calib), output=one, **opts))
    assert summary["world_size"] == 1
    two = tmp_path / "two" / "scores.safetensors"
    flags = [
        "--nsamples",
        12,
        "--keep",
        KEEP,
        "--targets",
        "all",
        "--method",
        method,
        "--device",
        "cpu",
        "--batch-size",
        4,
    ] + (["--stream"] if stream else [])
    r = torchrun("score", model, calib, "-o", two, *flags, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(two.parent) == ["scores.safetensors"]  # one file, no leftovers from rank 1
    assert_same_scores(one, two)
    (printed,) = [s for s in map(json.loads, r.stdout.splitlines()) if s["file"]]  # rank 0's summary
    same = lambda d: {k: v for k, v in d.items() if k not in VARY}  # noqa: E731
    assert (
        printed["world_size"] == 2
        and printed["file"] == str(two)
        and same({k: printed[k] for k in summary}) == same(summary)
    )


VARY = ("file", "world_size", "seconds", "tokens_per_s", "pass_seconds", "peak_memory_bytes", "activation_peak_bytes")


FAULT = """\
\"\"\"Under torchrun: rank 1's GPU runs out of memory in its pass (simulated), then the real CLI runs.\"\"\"
import os, sys
import torch
import spinctl.scoring.engine as sc
from spinctl.cli import main

if os.environ["RANK"] == "1":
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    sc.run_pass = oom
sys.argv[0] = "spinctl"
main()
"""


def test_failure_on_rank1_is_one_line_from_rank0(tiny_model, calib, tmp_path):
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    out = tmp_path / "out" / "s.safetensors"
    model = tiny_model()
    r = torchrun("score", model, calib, "-o", out, "--nsamples", 8, "--batch-size", 4, "--device", "cpu", script=script)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: rank 1: {model}: out of GPU memory at --batch-size 4; lower --batch-size or "
        f"--max-length (longest sample: {max_len(model, calib, 8)} tokens)"
    ], r.stderr[-3000:]
    assert not out.parent.exists() or not any(out.parent.iterdir())

    # The same bad input on every rank: every rank fails at once, rank 0 says it as one process would.
    r = torchrun("score", model, tmp_path / "nodata.csv", "-o", out, "--device", "cpu")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert (
        r.returncode == 1
        and len(errors) == 1
        and errors[0].startswith(f"error: {tmp_path / 'nodata.csv'}: no such data file")
    )


def max_len(model: Path, calib: Path, n: int) -> int:
    """Longest sample of rank 1's share of the first n selected rows."""
    from transformers import AutoTokenizer

    from spinctl.scoring.data import load_calibration

    cal = load_calibration(calib, AutoTokenizer.from_pretrained(model), n, 0, 2048)
    share = distributed.shard_samples(cal.samples, distributed.DistContext(1, 2, 1))
    return max(len(s.ids) for s in share)


def test_run_under_torchrun(tiny_model, tmp_path):
    """`torchrun -m spinctl run`: both ranks score, rank 0 alone selects, patches and verifies;
    the same selection as one process; a rerun takes every score file from rank 0's cache."""
    import shutil

    from spinctl.run import run
    from spinctl.runconfig import load_run_config

    shutil.copytree(tiny_model("llama", "float32", "100KB"), tmp_path / "model")
    (tmp_path / "spin.yaml").write_text(RUN_YAML.format(output="out1"))
    r = torchrun("run", tmp_path / "spin.yaml", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)  # --json: exactly one object on stdout, rank 0's
    assert two["verified"] and [s["cached"] for s in two["scores"]] == [False, False, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model", "out1", "out1.report", "spin.yaml"]

    one = run(load_run_config(tmp_path / "spin.yaml", ["output=out-one", "cache_dir=cache-one"]))
    from spinctl.io.formats import read_selection

    a, b = read_selection(Path(one["selection"])).indices, read_selection(Path(two["selection"])).indices
    assert one["selected"] == two["selected"] and a.keys() == b.keys()
    assert all(np.array_equal(a[n], b[n]) for n in a)

    r = torchrun("run", tmp_path / "spin.yaml", "--set", "output=out2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout)
    assert [s["cached"] for s in again["scores"]] == [True, True, True] and again["selected"] == two["selected"]
