"""snip's per-sample Σ_b |gy_bᵀ x_b| in each of its three ways, against float64 on random data.

The CPU loop and the CUDA fallback (bmm) run here on every machine. The fused Triton kernel
(benchmarks/kernel_check.py) runs in Triton's interpreter on CPU where Triton is installed
(CUDA builds of torch ship it; a CPU-only venv usually has none and skips), and natively on a
CUDA device. bf16 is checked on the device only: the interpreter computes in numpy, which has
no bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from spinctl.scoring.methods import abs_grad_, true_lengths

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_check.py"
sys.path.insert(0, str(CHECK.parent))
from kernel_check import LENGTHS, case  # noqa: E402


@pytest.mark.parametrize("way", ["loop", "bmm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_ways_match_float64(way, dtype):
    import torch

    gy, x, want = case(getattr(torch, dtype), "cpu")
    acc = torch.full((70, 90), 0.5)  # accumulates onto what is there
    abs_grad_(acc, gy, x, LENGTHS, way)
    assert acc.dtype == torch.float32
    # bf16 products are rounded to bf16 (8 bits) before the fp32 sum, as the model dtype dictates
    tol = 1e-6 if dtype == "float32" else 1e-2
    torch.testing.assert_close(acc.double(), want + 0.5, rtol=tol, atol=tol * float(want.max()))


def test_true_lengths_from_response_positions():
    import torch

    pos = torch.zeros(3, 6, dtype=torch.bool)
    pos[0, 2:6] = True
    pos[1, 1:3] = True  # a shorter sample, right-padded
    assert true_lengths(pos) == [6, 3, 0]


def run_check(*args: str, **env: str) -> None:
    res = subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, env={**os.environ, **env})
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


@pytest.mark.skipif(find_spec("triton") is None, reason="Triton is not installed (CUDA builds of torch ship it)")
def test_triton_kernel_in_interpreter():
    run_check("--device", "cpu", "--dtypes", "float32,float16", TRITON_INTERPRET="1")


def test_triton_kernel_on_device():
    import torch

    if find_spec("triton") is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and Triton")
    run_check("--device", "cuda")
