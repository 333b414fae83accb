"""Importance-score methods (docs/design.md §2): per-sample statistics of Linear layers in fp32 accumulators.

An accumulator hooks a set of nn.Linear modules (the whole model, or one decoder layer
when layers are streamed) and adds each batch's statistics into `acc`, a dict
name -> fp32 tensor. The dict can be all-reduced across processes before `scores`,
which turns it into score tensors [out, in]. Running the model is the caller's job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from spinctl.config import Method
from spinctl.errors import UnsupportedError


class Accumulator:
    """Base: hooks on named Linear modules; `acc` holds the fp32 statistics."""

    needs_grad = False

    def __init__(self, modules: dict[str, Any]):
        import torch

        self.modules = modules  # weight tensor name -> nn.Linear (weight [out, in])
        self.acc = {
            name: torch.zeros(self.stat_shape(m), dtype=torch.float32, device=m.weight.device)
            for name, m in modules.items()
        }
        self._handles: list = []
        self._batch = 0  # samples in the current batch
        self._calls: dict[str, int] = {}

    def stat_shape(self, module) -> tuple[int, ...]:
        raise NotImplementedError

    def attach(self) -> Accumulator:
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook_for(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Accumulator:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        for t in self.acc.values():
            t.zero_()

    def all_finite(self) -> bool:
        import torch

        return all(bool(torch.isfinite(t).all()) for t in self.acc.values())

    def unscale_(self, scale: float) -> None:
        """Undo a loss scale 2^k: dividing fp32 by a power of two is exact (short of fp32 subnormals)."""
        if scale != 1:
            for t in self.acc.values():
                t.div_(scale)

    def begin_batch(self, n_samples: int, positions=None) -> None:
        """positions: bool [B, T], True where the position's own token is a response token."""
        self._batch = n_samples
        self._calls.clear()

    def _hook_for(self, name: str):
        def hook(module, args, output):
            # A module called twice per forward (shared weights) would mix two gradients before abs.
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] > 1:
                raise UnsupportedError(
                    f"module {name[: -len('.weight')]} runs more than once per forward (shared weights); spinctl cannot score it"
                )
            self.on_forward(name, args[0], output)

        return hook

    def _per_sample(self, name: str, x):
        """x as [B, T, in]; a flattened [N, in] input is one sample only when B == 1."""
        if x.dim() == 3 and x.shape[0] == self._batch:
            return x
        if x.dim() == 2 and self._batch == 1:
            return x.unsqueeze(0)
        raise UnsupportedError(
            f"module {name[: -len('.weight')]} mixes tokens of several samples (input shape {list(x.shape)}); score with --batch-size 1"
        )

    def on_forward(self, name: str, x, output) -> None:
        raise NotImplementedError

    def scores(self, nsamples: int) -> Iterator[tuple[str, Any]]:
        """(name, fp32 scores [out, in]) per weight, one at a time, from the (possibly all-reduced) `acc`."""
        raise NotImplementedError


class SnipAccumulator(Accumulator):
    """S = |W| ⊙ Σ_s |∇_W L_s|, the per-sample gradient of a Linear formed as gy_sᵀ · x_s.

    Each sample's product covers its own tokens only (padding has exactly zero gradient,
    and tokens after its last response token none either). On CPU one sample at a time
    into a reused buffer: 1/B of a batched [B, out, in] product's memory, and the buffer
    stays in cache for the abs and the add. On CUDA the fused Triton kernel
    (abs_grad_triton.py) never writes a per-sample product to memory; without Triton one
    bmm per batch and an ord-1 norm over it.
    """

    needs_grad = True

    def __init__(self, modules):
        super().__init__(modules)
        self._lengths: list[int] = []  # true length of each sample of the batch
        self._bufs: dict = {}  # (out, in, dtype) -> reused per-sample product

    def stat_shape(self, module):
        return tuple(module.weight.shape)  # [out, in]

    def begin_batch(self, n_samples, positions=None):
        super().begin_batch(n_samples, positions)
        self._lengths = true_lengths(positions) if positions is not None else []

    def on_forward(self, name, x, output):
        if not output.requires_grad:
            raise UnsupportedError(f"module {name[: -len('.weight')]}: no gradient reaches its output")
        x = self._per_sample(name, x).detach()  # [B, T, in]; kept alive by the hook until backward
        output.register_hook(lambda gy: self._on_grad(name, x, gy))

    def _on_grad(self, name, x, gy):
        from spinctl.scoring import abs_grad_triton

        gy = gy.reshape(x.shape[0], -1, gy.shape[-1])  # [B, T, out]
        lengths = [min(n, x.shape[1]) for n in self._lengths] or [x.shape[1]] * x.shape[0]
        acc = self.acc[name]
        if not gy.is_cuda:
            abs_grad_(acc, gy, x, lengths, "loop", self._buffer(acc.shape, gy.dtype))
        else:
            abs_grad_(acc, gy, x, lengths, "triton" if abs_grad_triton.available() else "bmm")

    def _buffer(self, shape, dtype):
        import torch

        key = (*shape, dtype)
        if key not in self._bufs:
            self._bufs[key] = torch.empty(shape, dtype=dtype)
        return self._bufs[key]

    def scores(self, nsamples):
        for name, m in self.modules.items():
            yield name, self.acc[name].mul_(m.weight.detach().abs())  # in place: no second fp32 [out, in]


def abs_grad_(acc, gy, x, lengths: list[int], way: str, buf=None) -> None:
    """acc [out, in] fp32 += Σ_b |gy[b, :n_b]ᵀ · x[b, :n_b]| for gy [B, T, out], x [B, T, in].

    way: "loop" (CPU: one sample at a time into `buf` [out, in], the product in the model
    dtype), "triton" (the fused CUDA kernel, products in fp32) or "bmm" (CUDA without
    Triton: one [B, out, in] product in the model dtype, read once by an ord-1 norm).
    """
    import torch

    if way == "triton":
        from spinctl.scoring import abs_grad_triton

        abs_grad_triton.accumulate_(acc, gy, x, lengths)
    elif way == "bmm":
        acc += torch.linalg.vector_norm(torch.bmm(gy.transpose(1, 2), x), ord=1, dim=0, dtype=torch.float32)
    else:
        buf = torch.empty(acc.shape, dtype=gy.dtype, device=gy.device) if buf is None else buf
        for b, n in enumerate(lengths):
            torch.mm(gy[b, :n].transpose(0, 1), x[b, :n], out=buf)
            acc.add_(buf.abs_())


def true_lengths(positions) -> list[int]:
    """Per sample, one past its last response position: its real length, since the response
    runs to the end of the sample (0 for a sample without one). positions: bool [B, T]."""
    import torch

    idx = torch.arange(1, positions.shape[1] + 1, device=positions.device)
    return (positions * idx).amax(1).tolist()


class WandaAccumulator(Accumulator):
    """S = |W| · sqrt(Σ_s Σ_{t∈response(s)} x_t² / N), the input statistic per feature."""

    def stat_shape(self, module):
        return (module.weight.shape[1],)  # [in]

    def begin_batch(self, n_samples, positions=None):
        super().begin_batch(n_samples, positions)
        self._rows = positions.reshape(-1).nonzero().squeeze(1)  # [N] flat response positions
        self._last = (None, None)  # gate/up see the same input tensor: square it once

    def on_forward(self, name, x, output):

        if x is self._last[0]:
            self.acc[name] += self._last[1]
            return
        if x.dim() != 3 or x.shape[0] != self._batch:
            raise UnsupportedError(
                f"module {name[: -len('.weight')]} mixes tokens of several samples (input shape {list(x.shape)}); wanda needs per-position inputs"
            )
        xr = x.reshape(-1, x.shape[-1]).index_select(0, self._rows).float()  # [N, in]
        s = xr.square().sum(0)  # [in] (einsum "ni,ni->i" runs as a slow batched dot on CPU)
        self.acc[name] += s
        self._last = (x, s)

    def scores(self, nsamples):
        import torch

        for name, m in self.modules.items():
            yield name, m.weight.detach().abs().float() * torch.sqrt(self.acc[name] / nsamples)[None, :]


METHODS: dict[Method, type[Accumulator]] = {Method.SNIP: SnipAccumulator, Method.WANDA: WandaAccumulator}


# Model types whose causal-LM logits are lm_head(last hidden state) and nothing more (no
# soft-capping or logit scale), so the head may run on the response positions alone.
PLAIN_HEAD = ("llama", "mistral", "qwen2")


def response_loss(logits, labels):
    """Σ_s mean_t CE over response tokens, in fp32. logits [B, T, V]; labels [B, T], -100 = ignore."""
    return token_loss(logits[:, :-1], labels[:, 1:])  # position t predicts token t+1


def token_loss(logits, target):
    """Σ_s mean_t CE(logits[s, t], target[s, t]) over target != -100, in fp32. logits [B, R, V]."""
    import torch
    import torch.nn.functional as F

    sel = target != -100
    lg = logits[sel].float()  # [N, V]: only predicted response tokens leave the model dtype
    ce = F.cross_entropy(lg, target[sel], reduction="none")  # [N]
    count = sel.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    weight = (1.0 / count).expand_as(sel)[sel]  # [N]: 1 / (response tokens of its sample)
    return torch.dot(ce, weight.to(ce.dtype))
