"""`spinctl score` on SmolLM2-135M-Instruct against a plain training step over the same rows; prints JSON lines.

    python benchmarks/bench_score_real.py                  # 64 alpaca rows, float32, CPU
    python benchmarks/bench_score_real.py --compare old.safetensors   # also: same top-K sets as an older file?

Three processes, each fresh (so each pays the same first-touch costs), timed from outside:
1. the whole `spinctl score` command (load, tokenize, pass, top-K, file), its peak RSS;
2. one plain forward + backward over the same rows: batches of 8 sorted by length, the HF
   loss on the response tokens, weight gradients of the MLP weights only, no per-sample work
   (the pass alone is timed: a training step's cost, not its load);
3. the reference (skipped with --skip-reference): one forward + backward per sample with the
   MLP weights' gradients, |grad| accumulated in fp64, so that its top-K sets and scores are
   an independent check of the command's file.
The ratio spinctl / plain is the goal (<= 0.85), and the peak RSS (<= 3 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_score import compare_topk, read_topk  # noqa: E402
from bench_stream import compare, wait_rss  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "alpaca_cleaned_no_safety_train_1k.csv"
KEEP = 1e-3

# One plain training step over the rows, or the per-sample reference: run as `python -c` in a
# fresh process; prints one JSON line.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[6])
from safetensors.torch import save_file
from reference_loop import per_sample_loop, training_step
from spinctl.runtime import load_model
from spinctl.scoring import data as D
what, model_dir, data, n, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
lm = load_model(model_dir, "cpu", "float32", False)
rows = D.read_rows(data, "prompt", "response")
cal = D.encode(rows, D.select_rows(rows.count, n, 0, rows.path), lm.tokenizer, 2048, False)
samples = [(list(s.ids), s.n_prompt) for s in cal.samples]
t0 = time.perf_counter()
if what == "plain":
    training_step(lm.model, samples)
else:
    scores = per_sample_loop(lm.model, samples)
seconds = time.perf_counter() - t0
if what != "plain":
    save_file(scores, out)
print(json.dumps({"pass_seconds": round(seconds, 2), "tokens": cal.tokens}))
"""


def emit(**fields) -> None:
    print(json.dumps({"bench": "score_real", **fields}), flush=True)


def run_child(what: str, model: Path, data: Path, n: int, out: Path) -> tuple[float, int, dict]:
    """(wall seconds, peak RSS bytes, its JSON line) of the plain step or the reference, in a fresh process."""
    return wait_rss(
        [sys.executable, "-c", CHILD, what, str(model), str(data), str(n), str(out), str(ROOT / "benchmarks")]
    )


def top_k_of(dense: Path) -> dict:
    from safetensors.torch import load_file

    from spinctl.io.formats import keep_count
    from spinctl.scoring.engine import topk_ranked

    return {n: topk_ranked(t.reshape(-1), keep_count(KEEP, t.numel())) for n, t in load_file(dense).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--compare", type=Path, help="a score file of the same run made by other code: same top-K sets?")
    p.add_argument("--skip-reference", action="store_true", help="skip the per-sample reference (the slowest part)")
    p.add_argument("--max-memory", help="passed to spinctl score")
    p.add_argument("--repeat", type=int, default=2, help="runs of each, alternating; the best is kept")
    args = p.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: not found; pass --data")
    from spinctl.sources.fetch import fetch_model

    model = Path(fetch_model("smollm2-135m-instruct")["path"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.safetensors"
        cmd = ["spinctl", "score", str(model), str(args.data), "-o", str(out), "--nsamples", str(args.rows)]
        cmd += ["--keep", str(KEEP), "--device", "cpu", "--dtype", "float32", "--json"]
        cmd += ["--max-memory", args.max_memory] if args.max_memory else []
        cmd[0] = str(Path(sys.executable).parent / "spinctl")
        # Alternate the two, best of --repeat each: this machine's speed drifts by 10-20% over minutes.
        runs, plains = [], []
        for _ in range(args.repeat):
            runs.append(wait_rss(cmd))
            plains.append(run_child("plain", model, args.data, args.rows, Path(tmp) / "unused"))
        wall, _, summary = min(runs, key=lambda r: r[0])
        emit(
            what="spinctl_score",
            seconds=round(wall, 2),
            all_seconds=[round(r[0], 2) for r in runs],
            peak_rss_gb=round(max(r[1] for r in runs) / 1e9, 2),
            target_peak_rss_gb=3.0,
            summary=summary,
        )
        plain = min((p[2] for p in plains), key=lambda d: d["pass_seconds"])
        emit(
            what="plain_fwd_bwd",
            pass_seconds=plain["pass_seconds"],
            all_seconds=[p[2]["pass_seconds"] for p in plains],
            tokens=plain["tokens"],
            peak_rss_gb=round(max(p[1] for p in plains) / 1e9, 2),
        )
        emit(
            what="ratio",
            spinctl_over_plain=round(wall / plain["pass_seconds"], 3),
            spinctl_pass_over_plain=round(summary["pass_seconds"] / plain["pass_seconds"], 3),
            target="<= 0.85 (the whole command)",
        )
        if args.compare:
            emit(what="compare", file=str(args.compare), **compare(args.compare, out))
        if not args.skip_reference:
            dense = Path(tmp) / "reference.safetensors"
            _, _, ref = run_child("reference", model, args.data, args.rows, dense)
            emit(
                what="reference_per_sample",
                pass_seconds=ref["pass_seconds"],
                **compare_topk(top_k_of(dense), read_topk(out)),
            )


if __name__ == "__main__":
    main()
