"""snip's per-sample Σ_b |gy_bᵀ x_b| in each of its three ways, against float64 on random data.

The CPU loop and the CUDA fallback (bmm) run here on every machine. The fused Triton kernel
runs in Triton's interpreter on CPU where Triton is installed (CUDA builds of torch ship it;
a CPU-only venv usually has none and skips), and natively on a CUDA device. bf16 is checked
on the device only: the interpreter computes in numpy, which has no bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

from spinctl.scoring.methods import abs_grad_, true_lengths

LENGTHS = [40, 17, 0, 33]  # a full sample, a short one, an empty one (no response), another


def case(dtype, device="cpu"):
    import torch

    g = torch.Generator().manual_seed(0)
    gy = torch.randn(len(LENGTHS), 40, 70, generator=g)
    x = torch.randn(len(LENGTHS), 40, 90, generator=g)
    for b, n in enumerate(LENGTHS):  # padding has no gradient; its input is whatever the pad token gives
        gy[b, n:] = 0
    gy, x = gy.to(dtype), x.to(dtype)  # the reference sees the same rounded inputs
    want = sum((gy[b, :n].double().T @ x[b, :n].double()).abs() for b, n in enumerate(LENGTHS))
    return gy.to(device), x.to(device), want


@pytest.mark.parametrize("way", ["loop", "bmm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_ways_match_float64(way, dtype):
    import torch

    gy, x, want = case(getattr(torch, dtype))
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


TRITON_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_abs_grad import LENGTHS, case
from spinctl.scoring.methods import abs_grad_
for dtype in {dtypes!r}:
    gy, x, want = case(getattr(torch, dtype), {device!r})
    acc = torch.full((70, 90), 0.5, device={device!r})
    abs_grad_(acc, gy, x, LENGTHS, "triton")
    err = ((acc.double().cpu() - 0.5 - want).abs().max() / want.abs().max()).item()
    assert err < {tol!r}, (dtype, err)  # products and sums in fp32
print("ok")
"""


def run_triton(device: str, dtypes: tuple, env: dict) -> None:
    script = TRITON_SCRIPT.format(tests=os.path.dirname(__file__), dtypes=dtypes, device=device, tol=1e-5)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.skipif(find_spec("triton") is None, reason="Triton is not installed (CUDA builds of torch ship it)")
def test_triton_kernel_in_interpreter():
    run_triton("cpu", ("float32", "float16"), {**os.environ, "TRITON_INTERPRET": "1"})


def test_triton_kernel_on_device():
    import torch

    if find_spec("triton") is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and Triton")
    run_triton("cuda", ("float32", "float16", "bfloat16"), dict(os.environ))
