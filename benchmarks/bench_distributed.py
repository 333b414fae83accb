"""Times `torchrun --nproc-per-node 2 -m spinctl score` against one process on CPU and checks the files agree; prints JSON lines.

    python benchmarks/bench_distributed.py                 # 8 layers, hidden 256, snip, 48 rows
    python benchmarks/bench_distributed.py --method wanda --stream

Three fresh commands on the same random Llama and the same 48 rows of the fairness set:
one process with 1 thread, one process with 2 threads, and 2 ranks (gloo) with 1 thread
each. Each is timed as a whole (start, load, scoring, file), best of --repeat. The 2-rank
file must hold the same top-K set per tensor as the 1-process file, scores within 1e-5
relative. On a 2-core machine 2 ranks cannot beat 1 process with 2 threads by much: the
figures show what the data-parallel split costs (a second model load, the all-reduce).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_score import build_model, parse_args  # noqa: E402

SHAPE = dict(layers=8, hidden=256, intermediate=688, heads=4, vocab=4000)


def emit(**fields) -> None:
    print(json.dumps({"bench": "distributed", **fields}), flush=True)


def timed(cmd: list[str], threads: int, repeat: int) -> tuple[float, dict]:
    """Best wall time of `repeat` runs and rank 0's JSON summary (the one naming the file)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    best, summary = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
        best = min(best, seconds)
        lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        summary = next(s for s in lines if s.get("file"))
    return best, summary


def compare(one: Path, two: Path) -> dict:
    """Top-K sets per tensor and the largest relative score difference, on matching indices."""
    import numpy as np

    from spinctl.io.formats import read_scores

    a, b = read_scores(one), read_scores(two)
    same_sets, worst = a.indices.keys() == b.indices.keys(), 0.0
    for name in a.indices:
        ia, ib = np.argsort(a.indices[name]), np.argsort(b.indices[name])
        if not np.array_equal(a.indices[name][ia], b.indices[name][ib]):
            same_sets = False
            continue
        sa, sb = a.scores[name][ia].astype(np.float64), b.scores[name][ib].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(sa - sb) / np.abs(sa), initial=0.0)))
    return {
        "same_topk_sets": same_sets,
        "max_rel_diff": worst,
        "tensors": len(a.indices),
        "entries": int(sum(len(v) for v in a.indices.values())),
        "same_bytes": one.read_bytes() == two.read_bytes(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=48, help="samples scored")
    p.add_argument("--method", choices=["snip", "wanda"], default="snip")
    p.add_argument("--stream", action="store_true", help="score with --stream (layer by layer)")
    p.add_argument("--keep", type=float, default=1e-3)
    p.add_argument("--repeat", type=int, default=2, help="runs per timing, best kept (a shared CPU is noisy)")
    args = parse_args(p)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # stdout/stderr stay the JSON lines and errors
        t0 = time.perf_counter()
        build_model(work / "model", SHAPE, args.data_dir, "cpu", "float32")
        emit(
            what="build",
            seconds=round(time.perf_counter() - t0, 1),
            **SHAPE,
            rows=args.rows,
            method=args.method,
            stream=args.stream,
            cores=os.cpu_count(),
        )

        def command(out: Path, ranks: int) -> list[str]:
            launch = (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                if ranks > 1
                else [sys.executable]
            )
            return [
                *launch,
                "-m",
                "spinctl",
                "score",
                str(work / "model"),
                str(args.data),
                "-o",
                str(out),
                "--nsamples",
                str(args.rows),
                "--keep",
                str(args.keep),
                "--method",
                args.method,
                "--device",
                "cpu",
                "--json",
                *(["--stream"] if args.stream else []),
            ]

        runs, passes = {}, {}
        for name, ranks, threads in (
            ("1_rank_1_thread", 1, 1),
            ("1_rank_2_threads", 1, 2),
            ("2_ranks_1_thread_each", 2, 1),
        ):
            out = work / f"{name}.safetensors"
            seconds, summary = timed(command(out, ranks), threads, args.repeat)
            runs[name] = (seconds, out)
            passes[name] = summary["pass_seconds"]
            emit(
                what=name,
                ranks=ranks,
                threads_per_rank=threads,
                seconds=round(seconds, 2),
                repeat=args.repeat,
                pass_seconds=summary["pass_seconds"],
                tokens=summary["tokens"],
                samples=summary["samples"],
                world_size=summary.get("world_size"),
            )
        base = runs["1_rank_1_thread"][0]
        check = compare(runs["1_rank_1_thread"][1], runs["2_ranks_1_thread_each"][1])
        emit(what="equal_to_one_process", **check, tolerance=1e-5)
        emit(
            what="ratio",
            two_ranks_over_one_rank_1_thread=round(runs["2_ranks_1_thread_each"][0] / base, 2),
            two_ranks_over_one_rank_2_threads=round(runs["2_ranks_1_thread_each"][0] / runs["1_rank_2_threads"][0], 2),
            pass_two_ranks_over_one_rank_1_thread=round(passes["2_ranks_1_thread_each"] / passes["1_rank_1_thread"], 2),
            pass_two_ranks_over_one_rank_2_threads=round(
                passes["2_ranks_1_thread_each"] / passes["1_rank_2_threads"], 2
            ),
        )
        if not (check["same_topk_sets"] and check["max_rel_diff"] <= 1e-5):
            sys.exit("the 2-rank score file differs from the 1-process one")


if __name__ == "__main__":
    main()
