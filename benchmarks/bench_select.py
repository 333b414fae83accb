"""Selection speed: `spinctl select` on top-K score files of a Llama-2-7B-shaped model, and `spinctl --help`.

Builds three synthetic score files (224 tensors, keep 1e-4), times the whole command
(wall, start-up included; median of runs) for both modes, and times `spinctl --help`.
The kernel-against-numpy/torch figures on 45M-element arrays come from
bench_kernels.py, which `make bench` runs beside this one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spinctl.io.formats import keep_count, score_meta, write_scores  # noqa: E402

SPINCTL = [sys.executable, "-m", "spinctl"]
HIDDEN, INTER, LAYERS = 4096, 11008, 32
SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTER, HIDDEN),
    "up_proj": (INTER, HIDDEN),
    "down_proj": (HIDDEN, INTER),
}


def llama7b_shapes() -> dict[str, list[int]]:
    out = {}
    for layer in range(LAYERS):
        for proj, shape in SHAPES.items():
            part = "self_attn" if proj[0] in "qkvo" else "mlp"
            out[f"model.layers.{layer}.{part}.{proj}.weight"] = list(shape)
    return out


def fake_topk(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k distinct indices with descending scores (ties ordered by index), as a score file holds them."""
    idx = np.unique(rng.integers(0, n, k + k // 8 + 16))[:k]
    rng.shuffle(idx)
    sc = np.sort(rng.random(k, dtype=np.float32) + np.float32(1e-3))[::-1]
    order = np.lexsort((idx, -sc))
    return idx[order].astype(np.int64), sc[order]


def write_fake(path: Path, shapes: dict[str, list[int]], keep: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    entries = {name: fake_topk(rng, math.prod(s), keep_count(keep, math.prod(s))) for name, s in shapes.items()}
    meta = score_meta(
        method="snip",
        nsamples=128,
        seed=0,
        keep=keep,
        targets="all",
        max_length=2048,
        dtype="bfloat16",
        dataset_sha256="0" * 64,
        dataset_rows=1000,
        fingerprint="llama2-7b-shaped",
        shapes=shapes,
    )
    write_scores(path, entries, meta)


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spinctl-bench-select-"))
    try:
        shapes = llama7b_shapes()
        files = [root / f"{n}.safetensors" for n in ("retain", "privacy", "fairness")]
        for seed, f in enumerate(files):
            write_fake(f, shapes, args.keep, seed)
        subprocess.run(
            SPINCTL + ["--help"], check=True, stdout=subprocess.DEVNULL
        )  # warm the numba cache and page cache
        for mode in ("paper", "reference"):
            cmd = SPINCTL + [
                "select",
                "--retain",
                str(files[0]),
                "--couple",
                str(files[1]),
                "--couple",
                str(files[2]),
                "--p",
                str(args.keep),
                "--q",
                str(args.keep),
                "--mode",
                mode,
                "-o",
                str(root / "sel.safetensors"),
            ]
            wall(cmd)
            times = [wall(cmd) for _ in range(args.repeats)]
            print(
                json.dumps(
                    {
                        "bench": "select",
                        "mode": mode,
                        "tensors": len(shapes),
                        "keep": args.keep,
                        "entries_per_file": sum(keep_count(args.keep, math.prod(s)) for s in shapes.values()),
                        "wall_s": round(statistics.median(times), 3),
                        "target_s": 2.0,
                    }
                )
            )
        times = [wall(SPINCTL + ["--help"]) for _ in range(5)]
        print(json.dumps({"bench": "help", "wall_s": round(statistics.median(times), 3), "target_s": 0.5}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
