"""Times `spinctl score` against three plain baselines on a random Llama; prints JSON lines.

    python benchmarks/bench_score.py                       # CPU: 16 layers, hidden 512, float32, 48 rows
    python benchmarks/bench_score.py --shape llama2-7b     # GPU: Llama-2-7B shape, bf16, 128 rows
    python benchmarks/bench_score.py --shape tiny          # the llama2-7b code path at toy size (CPU ok)

The cpu shape times the whole command (a fresh process, load included) for spinctl, and
the loop alone for each baseline (reference_loop.py), all in one run:
- the reference loop: the official code's structure, a forward + backward per sample per layer;
- the per-sample loop: a forward + backward per sample over all layers, |grad| summed (what
  one-pass scoring costs without batching: where the reference loop's 16x goes);
- a training step: batches of 8, one backward, no per-sample work (the floor to aim at). The GPU shapes build the model on the device,
score it in-process (`score(..., loaded=...)`) and report the scoring pass itself.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA_DIR = ROOT.parent / "shared" / "data"
FAIRNESS = DATA_DIR / "beaver_train330k_fairness_safe_1k.csv"
PEAK_TFLOPS = 790.0  # H200 dense bf16, the design's yardstick
SHAPES = {  # layers, hidden, intermediate, heads, vocab, rows
    "cpu": dict(layers=16, hidden=512, intermediate=1376, heads=8, vocab=8000, rows=48),
    "llama2-7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000, rows=128),
    "tiny": dict(layers=2, hidden=64, intermediate=172, heads=4, vocab=1000, rows=128),
}


def ratio(num: float, den: float) -> float:
    """num/den to three significant figures: at toy sizes a fixed two decimals rounds a real
    ratio such as 0.004 to zero."""
    return float(f"{num / den:.3g}")


def emit(**fields) -> None:
    print(json.dumps({"bench": "score", **fields}), flush=True)


def corpus(data_dir: Path) -> list[str]:
    """Every text cell of the shared CSVs: what the on-the-spot tokenizer learns from."""
    texts = []
    for path in sorted(data_dir.glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                texts.extend(v for v in row.values() if v)
    return texts


def build_model(out: Path, shape: dict, data_dir: Path, device: str, dtype: str):
    """Random Llama of `shape` built directly on `device` and saved (config, tokenizer, safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spinctl.demo.tiny_models import tiny_config, train_tokenizer

    tok = train_tokenizer(corpus(data_dir), shape["vocab"])
    # The embedding keeps the shape's vocab even if the corpus yields fewer merges.
    cfg = tiny_config(
        "llama",
        max(len(tok), shape["vocab"]),
        shape["layers"],
        shape["hidden"],
        shape["intermediate"],
        shape["heads"],
        shape["heads"],
        max_positions=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.requires_grad_(False)
    model.eval()
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    return model, tok


def samples_of(model_dir: Path, tok, data: Path, n: int) -> list[tuple[list[int], int]]:
    from spinctl.scoring.data import load_calibration

    cal = load_calibration(data, tok, nsamples=n, seed=0, max_length=2048)
    return [(list(s.ids), s.n_prompt) for s in cal.samples]


def overlap(file: Path, ref: dict, keep: float) -> tuple[float, float]:
    """Mean and min over tensors of |ours ∩ reference| / |reference| for the top-K sets."""
    from spinctl.io.formats import read_scores

    ours = read_scores(file).indices
    fr = [len(set(ours[n].tolist()) & set(idx.tolist())) / max(len(idx), 1) for n, (idx, _) in ref.items()]
    return sum(fr) / len(fr), min(fr)


def compare_topk(x: dict, y: dict) -> dict:
    """Top-K agreement of name -> (indices, scores): identical sets?, mean/min overlap, largest relative score gap."""
    import numpy as np

    overlaps, gap = [], 0.0
    for name, (idx, xs) in x.items():
        other, ys = y[name]
        overlaps.append(len(set(idx.tolist()) & set(other.tolist())) / max(len(idx), 1))
        if len(idx) == len(other) and set(idx.tolist()) == set(other.tolist()):
            xs, ys = np.asarray(xs)[np.argsort(idx)], np.asarray(ys)[np.argsort(other)]  # both by flat index
            gap = max(gap, float(np.max(np.abs(ys - xs) / xs, initial=0)))
    return {
        "same_topk": min(overlaps) == 1.0 and set(x) == set(y),
        "topk_overlap_mean": round(sum(overlaps) / len(overlaps), 6),
        "topk_overlap_min": round(min(overlaps), 6),
        "max_rel_score_diff": gap,
    }


def read_topk(file: Path) -> dict:
    """name -> (indices, scores) of a score file, as `overlap` takes a reference."""
    from spinctl.io.formats import read_scores

    f = read_scores(file)
    return {n: (f.indices[n], f.scores[n]) for n in f.indices}


def timed_process(cmd: list[str], repeat: int) -> tuple[float, dict]:
    """Best wall time of `repeat` fresh processes (a shared CPU is noisy) and the last JSON summary."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        best = min(best, time.perf_counter() - t0)
    return best, json.loads(res.stdout.strip().splitlines()[-1])


def cpu_flow(args, shape: dict, work: Path) -> None:
    import torch
    from reference_loop import reference_loop

    from spinctl.io.formats import keep_count
    from spinctl.scoring.engine import topk_ranked

    model_dir = work / "model"
    _, tok = build_model(model_dir, shape, args.data_dir, "cpu", "float32")
    out = work / "scores.safetensors"
    opts = dict(nsamples=shape["rows"], keep=args.keep, device="cpu", method="snip")
    code = (
        "import json,sys; from spinctl.config import ScoreConfig; from spinctl.scoring.engine import score; "
        f"print(json.dumps(score(ScoreConfig(model=sys.argv[1], data=sys.argv[2], output=sys.argv[3], **{opts!r}))))"
    )
    lib_s, summary = timed_process([sys.executable, "-c", code, str(model_dir), str(args.data), str(out)], args.repeat)
    emit(shape=args.shape, what="spinctl_library", seconds=round(lib_s, 2), repeat=args.repeat, summary=summary)
    cli_s = None
    if subprocess.run([sys.executable, "-m", "spinctl", "score", "--help"], capture_output=True).returncode == 0:
        cli_out = work / "scores-cli.safetensors"
        cli_s, summary = timed_process(
            [
                sys.executable,
                "-m",
                "spinctl",
                "score",
                str(model_dir),
                str(args.data),
                "-o",
                str(cli_out),
                "--nsamples",
                str(shape["rows"]),
                "--keep",
                str(args.keep),
                "--device",
                "cpu",
                "--json",
            ],
            args.repeat,
        )
        emit(
            shape=args.shape,
            what="spinctl_cli",
            seconds=round(cli_s, 2),
            repeat=args.repeat,
            same_bytes=cli_out.read_bytes() == out.read_bytes(),
            **compare_topk(read_topk(out), read_topk(cli_out)),  # what holds across processes (§13)
            summary=summary,
        )
    if args.skip_reference:
        return
    from reference_loop import per_sample_loop, training_step
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    samples = samples_of(model_dir, tok, args.data, shape["rows"])
    t0 = time.perf_counter()
    ref = reference_loop(model, samples, keep=args.keep)
    ref_s = time.perf_counter() - t0
    mean, low = overlap(out, ref, args.keep)
    emit(
        shape=args.shape,
        what="reference_loop",
        seconds=round(ref_s, 2),
        passes=len(samples) * shape["layers"],
        topk_overlap_mean=round(mean, 4),
        topk_overlap_min=round(low, 4),
        keep=args.keep,
    )
    t0 = time.perf_counter()
    dense = per_sample_loop(model, samples)
    loop_s = time.perf_counter() - t0
    mean, low = overlap(
        out, {n: topk_ranked(t.reshape(-1), keep_count(args.keep, t.numel())) for n, t in dense.items()}, args.keep
    )
    emit(
        shape=args.shape,
        what="per_sample_loop",
        seconds=round(loop_s, 2),
        topk_overlap_mean=round(mean, 4),
        topk_overlap_min=round(low, 4),
    )
    t0 = time.perf_counter()
    training_step(model, samples)
    step_s = time.perf_counter() - t0
    emit(shape=args.shape, what="training_step", seconds=round(step_s, 2), batch_size=8)
    whole = cli_s if cli_s is not None else lib_s
    passed = summary["pass_seconds"]
    emit(
        shape=args.shape,
        what="ratio",
        timed="cli" if cli_s is not None else "library",
        reference_over_spinctl=ratio(ref_s, whole),
        per_sample_over_spinctl=ratio(loop_s, whole),
        training_step_over_spinctl=ratio(step_s, whole),
        reference_over_pass=ratio(ref_s, passed),
        per_sample_over_pass=ratio(loop_s, passed),
        training_step_over_pass=ratio(step_s, passed),
        target="reference >= 10, per-sample >= 1.3 (whole command)",
    )


def device_flow(args, shape: dict, work: Path) -> None:
    """The llama2-7b path: build on the device, score in-process, reference on 8 samples."""
    import torch
    from reference_loop import reference_loop

    from spinctl.config import ScoreConfig
    from spinctl.runtime import LoadedModel
    from spinctl.scoring.engine import score

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "llama2-7b" and not device.startswith("cuda"):
        sys.exit("--shape llama2-7b needs a CUDA device; try --shape tiny on CPU")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model_dir = work / "model"
    t0 = time.perf_counter()
    model, tok = build_model(model_dir, shape, args.data_dir, device, dtype)
    emit(shape=args.shape, what="build", seconds=round(time.perf_counter() - t0, 1), device=device, dtype=dtype)
    loaded = LoadedModel(model_dir, model, tok, torch.device(device), getattr(torch, dtype))

    def run(method: str, n: int, name: str) -> dict:
        cfg = ScoreConfig(
            model=model_dir,
            data=str(args.data),
            output=work / f"{name}.safetensors",
            method=method,
            nsamples=n,
            keep=args.keep,
            device=device,
            dtype=dtype,
            batch_size=args.batch_size,
        )
        summary = score(cfg, loaded=loaded)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return summary

    small = run("snip", 8, "snip8")  # also the warm-up: kernels, allocator
    emit(shape=args.shape, what="spinctl_snip_8", **small)
    full = run("snip", shape["rows"], "snip")
    scored = sum(
        m.weight.numel() for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))
    )
    flops = 6 * full["tokens"] * scored
    emit(
        shape=args.shape,
        what="spinctl_snip",
        pass_seconds=full["pass_seconds"],
        target_pass_seconds=2.0,
        peak_gib=round(full["peak_memory_bytes"] / 2**30, 2),
        target_peak_gib=48,
        tokens_per_s=full["tokens_per_s"],
        tflops=round(flops / full["pass_seconds"] / 1e12, 1),
        fraction_of_peak=round(flops / full["pass_seconds"] / 1e12 / PEAK_TFLOPS, 3),
        scored_params=scored,
        summary=full,
    )
    again = run("snip", shape["rows"], "snip-again")  # determinism: the same run twice
    a, b = work / "snip.safetensors", work / "snip-again.safetensors"
    mean, low = overlap(b, read_topk(a), args.keep)
    emit(
        shape=args.shape,
        what="spinctl_snip_twice",
        byte_identical=a.read_bytes() == b.read_bytes(),
        topk_overlap_mean=round(mean, 6),
        topk_overlap_min=round(low, 6),
        pass_seconds=again["pass_seconds"],
    )
    wanda = run("wanda", shape["rows"], "wanda")
    emit(
        shape=args.shape,
        what="spinctl_wanda",
        pass_seconds=wanda["pass_seconds"],
        peak_gib=round(wanda["peak_memory_bytes"] / 2**30, 2),
        summary=wanda,
    )
    if args.skip_reference:
        return
    samples = samples_of(model_dir, tok, args.data, 8)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ref = reference_loop(model, samples, accumulate="fp32", keep=args.keep)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ref_s = time.perf_counter() - t0
    mean, low = overlap(work / "snip8.safetensors", ref, args.keep)
    emit(
        shape=args.shape,
        what="reference_loop_8",
        seconds=round(ref_s, 2),
        accumulate="fp32",
        keep=args.keep,
        topk_overlap_mean=round(mean, 4),
        topk_overlap_min=round(low, 4),
        target_overlap=0.95,
        reference_128_estimate_s=round(ref_s * shape["rows"] / 8, 1),
        speedup_estimate=round(ref_s * shape["rows"] / 8 / full["pass_seconds"], 1),
    )


def parse_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The benchmarks' shared options (data, tokenizer corpus, work directory), parsed and checked."""
    p.add_argument("--data", type=Path, default=FAIRNESS)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="CSVs the tokenizer is trained on")
    p.add_argument("--workdir", type=Path, help="where the model is saved (default: a temporary directory)")
    args = p.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: not found; pass --data and --data-dir")
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--rows", type=int, help="samples scored (default: 48 cpu, 128 otherwise)")
    p.add_argument("--keep", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, help="device shapes: samples per batch (default auto)")
    p.add_argument("--device", help="device shapes: cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--repeat", type=int, default=2, help="cpu shape: spinctl runs per timing, best kept")
    p.add_argument("--skip-reference", action="store_true")
    args = parse_args(p)
    shape = dict(SHAPES[args.shape])
    for key in ("layers", "hidden", "intermediate", "heads", "rows"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        (cpu_flow if args.shape == "cpu" else device_flow)(args, shape, Path(tmp))


if __name__ == "__main__":
    main()
