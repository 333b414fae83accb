"""Peak memory and time of `spinctl score --stream` against in-memory scoring; prints JSON lines.

    python benchmarks/bench_stream.py                     # CPU: 12-layer hidden-768 fp32 Llama (~0.9 GB), peak RSS
    python benchmarks/bench_stream.py --gpu               # GPU: Llama-2-13B shape, bf16, --stream under a memory cap
    python benchmarks/bench_stream.py --gpu --shape tiny  # the --gpu code path at toy size (CPU ok)

CPU: each run is a fresh `python -m spinctl score` process; its peak RSS comes from
os.wait4's ru_maxrss. Linux carries the parent's high-water RSS into a child at exec, so this
process never imports torch: the model is built in a child process too. The model's intermediate size is Llama-like (2048) and its embedding
rows are padded past the tokenizer's vocabulary to reach --model-gb (~91k rows at 0.9 GB), as
in small models with large vocabularies. GPU: the model is built on the device, written as
shards and freed; then in-memory scoring (no limit) and --stream scoring under
torch.cuda.set_per_process_memory_fraction (a cap below the model's own size) run as child
processes that report time and peak device memory. Both flows time the read-ahead
(prefetch.py) against the same --stream run without it: on CUDA the default (on) against
SPINCTL_PREFETCH=0, on CPU the --spill-dir run (where reads cost most; off by default) against
SPINCTL_PREFETCH=1. The files must be byte-identical.
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
from bench_score import compare_topk, corpus, parse_args, read_topk  # noqa: E402

GPU_SHAPES = {  # layers, hidden, intermediate, heads, vocab, rows, shard size
    "llama2-13b": dict(layers=40, hidden=5120, intermediate=13824, heads=40, vocab=32000, rows=128, shard="5GB"),
    "tiny": dict(layers=3, hidden=64, intermediate=172, heads=4, vocab=1000, rows=16, shard="100KB"),
}


def emit(**fields) -> None:
    print(json.dumps({"bench": "stream", **fields}), flush=True)


def build(
    out: str,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    vocab: int,
    data_dir: str,
    device: str,
    dtype: str,
    shard: str,
    model_bytes: float | None = None,
) -> dict:
    """A random Llama saved as shards (config, tokenizer, safetensors); its weight bytes and the device's memory."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from spinctl.demo.tiny_models import tiny_config, train_tokenizer

    hf_logging.disable_progress_bar()
    tok = train_tokenizer(corpus(Path(data_dir)), vocab)
    rows = max(len(tok), vocab)
    if model_bytes:  # pad the embedding rows (input and output) until the weights reach model_bytes
        per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
        item = getattr(torch, dtype).itemsize
        rows = max(rows, int((model_bytes / item - layers * per_layer - hidden) // (2 * hidden)))
    cfg = tiny_config("llama", rows, layers, hidden, intermediate, heads, heads, max_positions=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size=shard)
    tok.save_pretrained(out)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory if device.startswith("cuda") else 0
    return {"model_bytes": size, "device_total_bytes": total, "embedding_rows": rows}


def build_in_child(**kw) -> dict:
    """`build` in a child process (see the module docstring)."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from bench_stream import build; "
        "print(json.dumps(build(**json.loads(sys.argv[1]))))"
    )
    res = subprocess.run([sys.executable, "-c", code, json.dumps(kw, default=str)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"building the model failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def wait_rss(cmd: list[str], env: dict | None = None) -> tuple[float, int, dict]:
    """Run cmd; (wall seconds, peak RSS bytes from wait4, the JSON object on its last stdout line)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        text = out.read()
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{err.read()[-3000:]}")
    return wall, usage.ru_maxrss * 1024, json.loads(text.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    """Top-K agreement of two score files (compare_topk)."""
    return compare_topk(read_topk(a), read_topk(b))


def cpu_flow(args, work: Path) -> None:
    model = work / "model"
    t0 = time.perf_counter()
    built = build_in_child(
        out=model,
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        vocab=args.vocab,
        data_dir=args.data_dir,
        device="cpu",
        dtype="float32",
        shard="500MB",
        model_bytes=args.model_gb * 1e9,
    )
    emit(
        what="build",
        seconds=round(time.perf_counter() - t0, 1),
        model_bytes=built["model_bytes"],
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        embedding_rows=built["embedding_rows"],
        dtype="float32",
    )
    _, base_rss, _ = wait_rss(
        [sys.executable, "-c", "import json, torch, transformers, spinctl.scoring.engine; print(json.dumps({}))"]
    )
    base = [
        sys.executable,
        "-m",
        "spinctl",
        "score",
        str(model),
        str(args.data),
        "--nsamples",
        str(args.rows),
        "--keep",
        str(args.keep),
        "--method",
        args.method,
        "--device",
        "cpu",
        "--json",
    ]
    runs = {"in_memory": [], "stream": ["--stream"]}
    if not args.no_spill:
        (work / "spill").mkdir()
        runs["stream_spill"] = ["--stream", "--spill-dir", str(work / "spill")]
        runs["stream_spill_prefetch"] = runs["stream_spill"]  # read-ahead forced on: where reads cost most on CPU
    rss, summaries = {}, {}
    for what, extra in runs.items():
        env = {**os.environ, "SPINCTL_PREFETCH": "1"} if what.endswith("_prefetch") else None
        wall, rss[what], summary = wait_rss(base + ["-o", str(work / f"{what}.safetensors"), *extra], env)
        summaries[what] = summary | {"peak_rss_bytes": rss[what]}
        emit(
            what=what,
            seconds=round(wall, 2),
            pass_seconds=summary["pass_seconds"],
            peak_rss_bytes=rss[what],
            peak_rss_gib=round(rss[what] / 2**30, 3),
            samples=summary["samples"],
            tokens=summary["tokens"],
            batch_size=summary["batch_size"],
            activation_peak_bytes=summary.get("activation_peak_bytes"),
        )
    if "stream_spill" in runs:
        prefetch_line("stream_spill_prefetch", "stream_spill", summaries, work)
    for what in runs:
        if what not in ("in_memory", "stream_spill_prefetch"):
            emit(
                what=f"{what}_vs_in_memory",
                rss_ratio=round(rss[what] / rss["in_memory"], 3),
                target="<= 0.6",
                import_baseline_rss_bytes=base_rss,
                method=args.method,
                **compare(work / "in_memory.safetensors", work / f"{what}.safetensors"),
            )


def prefetch_line(on: str, off: str, summaries: dict, work: Path) -> None:
    """The read-ahead's effect (prefetch.py): two runs that differ only in it; the same bytes expected."""
    a, b = summaries[on], summaries[off]
    emit(
        what="prefetch",
        runs=[on, off],
        pass_seconds_on=a["pass_seconds"],
        pass_seconds_off=b["pass_seconds"],
        off_over_on=round(b["pass_seconds"] / a["pass_seconds"], 3),
        peak_rss_bytes_on=a["peak_rss_bytes"],
        peak_rss_bytes_off=b["peak_rss_bytes"],
        same_bytes=(work / f"{on}.safetensors").read_bytes() == (work / f"{off}.safetensors").read_bytes(),
        **compare(work / f"{on}.safetensors", work / f"{off}.safetensors"),  # what holds across processes (§13)
    )


CHILD = """
import json, sys, time, torch
from spinctl.config import ScoreConfig
from spinctl.scoring.engine import score
opts, fraction = json.loads(sys.argv[1]), float(sys.argv[2])
cuda = opts["device"].startswith("cuda")
if cuda and fraction < 1:
    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(opts["device"]))
t0 = time.perf_counter()
summary = score(ScoreConfig(**opts))
out = {"wall": time.perf_counter() - t0, "summary": summary, "limit_applied": cuda and fraction < 1}
if cuda:
    out["max_allocated"] = torch.cuda.max_memory_allocated()
    out["max_reserved"] = torch.cuda.max_memory_reserved()
print(json.dumps(out))
"""


def gpu_flow(args, work: Path) -> None:
    """Llama-2-13B shape: --stream under a cap below the model's size, beside in-memory without one."""
    shape = GPU_SHAPES[args.shape]
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"], capture_output=True, text=True
    )
    cuda = probe.stdout.strip() == "1"
    if args.shape != "tiny" and not cuda:
        sys.exit("--gpu needs a CUDA device; try --gpu --shape tiny on CPU")
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    model = work / "model"
    t0 = time.perf_counter()
    built = build_in_child(
        out=model,
        layers=shape["layers"],
        hidden=shape["hidden"],
        intermediate=shape["intermediate"],
        heads=shape["heads"],
        vocab=shape["vocab"],
        data_dir=args.data_dir,
        device=device,
        dtype=dtype,
        shard=shape["shard"],
    )
    size, total = built["model_bytes"], built["device_total_bytes"]
    limit = int(size * args.cap)  # less memory than the weights alone need
    emit(
        what="build",
        shape=args.shape,
        seconds=round(time.perf_counter() - t0, 1),
        model_bytes=size,
        device=device,
        dtype=dtype,
        device_total_bytes=total,
        stream_limit_bytes=limit,
    )
    opts = dict(
        model=str(model),
        data=str(args.data),
        nsamples=args.rows or shape["rows"],
        keep=args.keep,
        method=args.method,
        device=device,
        dtype=dtype,
        batch_size=args.batch_size,
    )
    res = {}
    capped = limit / total if cuda else 1.0
    for what, extra, fraction, prefetch in (
        ("in_memory", {}, 1.0, None),
        ("stream", {"stream": True}, capped, "1"),  # the default on CUDA; forced so --shape tiny on CPU tests it
        ("stream_no_prefetch", {"stream": True}, capped, "0"),
    ):
        o = {**opts, **extra, "output": str(work / f"{what}.safetensors")}
        env = {**os.environ, "SPINCTL_PREFETCH": prefetch} if prefetch else None
        wall, rss, res[what] = wait_rss([sys.executable, "-c", CHILD, json.dumps(o), str(fraction)], env)
        res[what]["summary"]["peak_rss_bytes"] = rss
        s = res[what]["summary"]
        emit(
            what=what,
            seconds=round(wall, 2),
            pass_seconds=s["pass_seconds"],
            tokens_per_s=s["tokens_per_s"],
            peak_device_bytes=res[what].get("max_allocated"),
            peak_device_reserved_bytes=res[what].get("max_reserved"),
            peak_device_gib=round(res[what]["max_allocated"] / 2**30, 2) if "max_allocated" in res[what] else None,
            limit_applied=res[what]["limit_applied"],
            limit_bytes=limit if what.startswith("stream") else None,
            peak_rss_bytes=rss,
            samples=s["samples"],
            tokens=s["tokens"],
            batch_size=s["batch_size"],
        )
    peak = res["stream"].get("max_allocated")
    prefetch_line("stream", "stream_no_prefetch", {k: v["summary"] for k, v in res.items()}, work)
    emit(
        what="stream_vs_in_memory",
        shape=args.shape,
        time_ratio=round(res["stream"]["summary"]["pass_seconds"] / res["in_memory"]["summary"]["pass_seconds"], 2),
        stream_peak_below_model=None if peak is None else peak < size,
        **compare(work / "in_memory.safetensors", work / "stream.safetensors"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the GPU figure (Llama-2-13B shape, bf16)")
    p.add_argument("--shape", choices=sorted(GPU_SHAPES), default="llama2-13b", help="--gpu: model shape")
    p.add_argument(
        "--cap", type=float, default=0.5, help="--gpu: --stream's device memory cap, as a fraction of the model's bytes"
    )
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16000, help="tokenizer vocabulary trained on --data-dir")
    p.add_argument(
        "--model-gb", type=float, default=0.9, help="CPU: weight bytes (1e9) reached by padding the embedding rows"
    )
    p.add_argument("--rows", type=int, help="samples scored (default: 32 CPU, the shape's for --gpu)")
    p.add_argument("--method", choices=("snip", "wanda"), default="snip")
    p.add_argument("--keep", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, help="--gpu: samples per batch (default auto)")
    p.add_argument("--no-spill", action="store_true", help="CPU: skip the --spill-dir run")
    args = parse_args(p)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.gpu:
            gpu_flow(args, Path(tmp))
        else:
            args.rows = args.rows or 32
            cpu_flow(args, Path(tmp))


if __name__ == "__main__":
    main()
