"""Patch speed: spinctl patch against `cp -r` + `sha256sum` on a synthetic 1.6 GB, 6-shard bf16 checkpoint.

Prints JSON lines: out-of-place with hashes (median of alternating runs, ratio to the
baseline), in place with --no-hash (wall including start-up), and peak RSS of spinctl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spinctl.io.checkpoint import open_checkpoint  # noqa: E402
from spinctl.io.formats import write_selection  # noqa: E402

SPINCTL = [sys.executable, "-m", "spinctl"]


def write_shard(path: Path, tensors: dict[str, tuple[int, int]], rng: np.random.Generator) -> None:
    """A bf16 safetensors file of random bytes, written by hand (numpy has no bfloat16)."""
    header, offset = {}, 0
    for name, (rows, cols) in tensors.items():
        nbytes = rows * cols * 2
        header[name] = {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for rows, cols in tensors.values():
            f.write(rng.integers(0, 2**16, rows * cols, dtype=np.uint16).tobytes())


def build(root: Path, shards: int, per_shard: int, shape: tuple[int, int], per_tensor: int, touched: int) -> Path:
    """Model dir + selection: `per_tensor` random elements of every tensor in the first `touched` shards."""
    model = root / "model"
    model.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        names = {f"model.layers.{s * per_shard + i}.mlp.up_proj.weight": shape for i in range(per_shard)}
        write_shard(model / fn, names, rng)
        weight_map.update({n: fn for n in names})
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
    )
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ck = open_checkpoint(model)
    n = shape[0] * shape[1]
    selected = {}
    for name, t in ck.tensors.items():
        hit = int(t.file.name[6:11]) <= touched
        selected[name] = np.unique(rng.integers(0, n, per_tensor)) if hit else np.zeros(0, np.int64)
    meta = {
        "mode": "paper",
        "p": 0.0,
        "q": 0.0,
        "retain_sha256": "",
        "couple_sha256": [],
        "fingerprint": ck.fingerprint(),
        "shapes": {k: list(shape) for k in selected},
    }
    write_selection(root / "selection.safetensors", selected, meta)
    return model


def timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the child) for one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {cmd}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--per-shard", type=int, default=3, help="tensors per shard (3 × 11008×4096 bf16 ≈ 270 MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spinctl-bench-patch-", dir=args.workdir))
    try:
        model = build(root, args.shards, args.per_shard, (args.rows, args.cols), per_tensor=25, touched=4)
        sel = root / "selection.safetensors"
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        base_t, spin_t, rss = [], [], []
        for i in range(args.repeats):  # alternate so drift in the shared machine hits both alike
            cp, out = root / f"cp{i}", root / f"out{i}"
            base_t.append(timed(f"cp -r {model} {cp} && sha256sum {cp}/*.safetensors", shell=True)[0])
            wall, peak = timed(SPINCTL + ["patch", str(model), str(out), "--selection", str(sel), "--quiet"])
            spin_t.append(wall)
            rss.append(peak)
            shutil.rmtree(cp)
            shutil.rmtree(out)
        base, spin = statistics.median(base_t), statistics.median(spin_t)
        print(
            json.dumps(
                {
                    "bench": "patch_out_of_place",
                    "bytes": size,
                    "spinctl_s": round(spin, 3),
                    "baseline": "cp -r + sha256sum",
                    "baseline_s": round(base, 3),
                    "ratio": round(spin / base, 3),
                    "target_ratio": 1.3,
                    "runs": args.repeats,
                }
            )
        )
        work = root / "work"
        shutil.copytree(model, work)
        wall, peak = timed(
            SPINCTL + ["patch", str(work), "--in-place", "--no-hash", "--selection", str(sel), "--quiet"]
        )
        rss.append(peak)
        ok = subprocess.run(SPINCTL + ["verify", str(work)], capture_output=True).returncode == 0
        print(
            json.dumps(
                {
                    "bench": "patch_in_place_no_hash",
                    "bytes": size,
                    "wall_s": round(wall, 3),
                    "target_s": 3.0,
                    "verified": ok,
                }
            )
        )
        print(json.dumps({"bench": "patch_peak_rss", "peak_rss_mb": round(max(rss) / 2**20, 1), "target_mb": 400}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
