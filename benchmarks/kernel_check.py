"""The fused Triton per-sample |grad| kernel against float64, and on CUDA its speed against the bmm fallback; JSON lines.

    python benchmarks/kernel_check.py --device cuda --speed     # on a GPU (gpu_check.sh kernel)
    TRITON_INTERPRET=1 python benchmarks/kernel_check.py --device cpu --dtypes float32,float16

Exits 1 when a relative error exceeds the tolerance. Needs only torch and Triton (no pytest:
the GPU image may not have it); tests/test_abs_grad.py runs it in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinctl.scoring.methods import abs_grad_  # noqa: E402

LENGTHS = [40, 17, 0, 33]  # a full sample, a short one, an empty one (no response), another
TOL = 1e-5  # products and sums in fp32: only the inputs' rounding, which the reference shares


def case(dtype, device: str, lengths=LENGTHS, T: int = 40, out: int = 70, inp: int = 90, seed: int = 0):
    """gy [B, T, out], x [B, T, in] with zero gradient past each length, and the float64 answer."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(len(lengths), T, out, generator=g)
    x = torch.randn(len(lengths), T, inp, generator=g)
    for b, n in enumerate(lengths):
        gy[b, n:] = 0  # padding has no gradient; its input is whatever the pad token gives
    gy, x = gy.to(dtype), x.to(dtype)  # the reference sees the same rounded inputs
    want = sum((gy[b, :n].double().T @ x[b, :n].double()).abs() for b, n in enumerate(lengths))
    return gy.to(device), x.to(device), want


def check(device: str, dtypes: list[str]) -> bool:
    ok = True
    for name in dtypes:
        gy, x, want = case(getattr(torch, name), device)
        acc = torch.full(want.shape, 0.5, device=device)  # accumulates onto what is there
        abs_grad_(acc, gy, x, LENGTHS, "triton")
        err = float((acc.double().cpu() - 0.5 - want).abs().max() / want.abs().max())
        ok &= err < TOL
        print(json.dumps({"bench": "kernel_check", "dtype": name, "device": device, "max_rel_err": err, "tol": TOL}))
    return ok


def speed(device: str, repeat: int = 5) -> None:
    """One 7B MLP Linear (11008 x 4096), 8 samples of 256-512 tokens, bf16: kernel vs bmm + norm."""
    lengths = torch.randint(256, 513, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    gy = torch.randn(8, 512, 11008, device=device, dtype=torch.bfloat16)
    x = torch.randn(8, 512, 4096, device=device, dtype=torch.bfloat16)
    acc = torch.zeros(11008, 4096, device=device)
    times = {}
    for way in ("triton", "bmm"):
        abs_grad_(acc, gy, x, lengths, way)  # compile, allocator
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            abs_grad_(acc, gy, x, lengths, way)
        end.record()
        torch.cuda.synchronize()
        times[way] = start.elapsed_time(end) / repeat
    flops = 2 * sum(lengths) * 11008 * 4096
    print(
        json.dumps(
            {
                "bench": "kernel_speed",
                "shape": "8 samples, 11008x4096, bf16",
                "triton_ms": round(times["triton"], 3),
                "bmm_ms": round(times["bmm"], 3),
                "bmm_over_triton": round(times["bmm"] / times["triton"], 2),
                "triton_tflops": round(flops / times["triton"] / 1e9, 1),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--speed", action="store_true", help="also time the kernel against bmm (CUDA)")
    args = p.parse_args()
    ok = check(args.device, args.dtypes.split(","))
    if args.speed:
        speed(args.device)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
