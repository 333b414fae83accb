"""snip's per-sample |grad| on CUDA as one fused Triton kernel per Linear per batch.

acc[o, i] += Σ_b |Σ_{t < n_b} gy[b, t, o] · x[b, t, i]|. Each program owns one [BLOCK_O, BLOCK_I]
tile of the weight: it forms every sample's product for that tile in fp32 registers
(tensor-core dots over blocks of the sample's own tokens), adds its absolute value to a
running sum, and updates the accumulator once at the end. The batched alternative writes
a [B, out, in] tensor to HBM and reads it back (about 2 TB of traffic for 128 samples of a
7B model's Linears); this reads gy and x only. Tokens past a sample's length (padding, and
nothing after its last response token has a gradient) are never loaded.

Triton ships with CUDA builds of torch; CPU builds have none and take the plain path
(methods.py). Tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1) on CPU
where Triton is installed, and on the device where there is one.
"""

from __future__ import annotations

import functools
import os

BLOCK_O = 64  # a 64 x 64 fp32 tile twice (product, running sum): 64 registers a thread at 4 warps
BLOCK_I = 64
BLOCK_T = 32  # tokens per dot: the reduction dimension


@functools.cache
def available() -> bool:
    """Triton importable and a CUDA device present (SPINCTL_NO_TRITON=1 turns it off)."""
    if os.environ.get("SPINCTL_NO_TRITON") == "1":
        return False
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernel():
    """Defined on first use: importing this module must not need Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def abs_grad(
        acc_ptr, gy_ptr, x_ptr, len_ptr, B, OUT, IN,
        s_gb, s_gt, s_go, s_xb, s_xt, s_xi, s_ao, s_ai,
        BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        offs_o = tl.program_id(0) * BO + tl.arange(0, BO)
        offs_i = tl.program_id(1) * BI + tl.arange(0, BI)
        in_o = offs_o < OUT
        in_i = offs_i < IN
        total = tl.zeros((BO, BI), dtype=tl.float32)
        for b in range(0, B):
            n = tl.load(len_ptr + b)
            prod = tl.zeros((BO, BI), dtype=tl.float32)
            for t0 in range(0, n, BT):
                offs_t = t0 + tl.arange(0, BT)
                in_t = offs_t < n
                g = tl.load(  # [BT, BO]
                    gy_ptr + b * s_gb + offs_t[:, None] * s_gt + offs_o[None, :] * s_go,
                    mask=in_t[:, None] & in_o[None, :],
                    other=0.0,
                )
                xt = tl.load(  # [BT, BI]
                    x_ptr + b * s_xb + offs_t[:, None] * s_xt + offs_i[None, :] * s_xi,
                    mask=in_t[:, None] & in_i[None, :],
                    other=0.0,
                )
                if IEEE:  # fp32 models: no tf32 rounding of the inputs
                    prod += tl.dot(tl.trans(g), xt, input_precision="ieee")
                else:
                    prod += tl.dot(tl.trans(g), xt)
            total += tl.abs(prod)
        ptrs = acc_ptr + offs_o[:, None] * s_ao + offs_i[None, :] * s_ai
        mask = in_o[:, None] & in_i[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + total, mask=mask)

    return abs_grad


def accumulate_(acc, gy, x, lengths: list[int]) -> None:
    """acc [out, in] fp32 += Σ_b |gy[b, :n_b]ᵀ · x[b, :n_b]|; gy [B, T, out], x [B, T, in]."""
    import torch
    import triton

    B, _, OUT = gy.shape
    IN = x.shape[2]
    n = torch.tensor(lengths, dtype=torch.int32, device=gy.device)
    grid = (triton.cdiv(OUT, BLOCK_O), triton.cdiv(IN, BLOCK_I))
    _kernel()[grid](
        acc, gy, x, n, B, OUT, IN,
        *gy.stride(), *x.stride(), *acc.stride(),
        BO=BLOCK_O, BI=BLOCK_I, BT=BLOCK_T, IEEE=gy.dtype == torch.float32,
    )  # fmt: skip
