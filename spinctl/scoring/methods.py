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
    """S = |W| ⊙ Σ_s |∇_W L_s|, the per-sample gradient formed as gy[b]ᵀ · x[b] (one bmm per Linear)."""

    needs_grad = True

    def stat_shape(self, module):
        return tuple(module.weight.shape)  # [out, in]

    def on_forward(self, name, x, output):
        if not output.requires_grad:
            raise UnsupportedError(f"module {name[: -len('.weight')]}: no gradient reaches its output")
        x = self._per_sample(name, x).detach()  # [B, T, in]; kept alive by the hook until backward
        output.register_hook(lambda gy: self._on_grad(name, x, gy))

    def _on_grad(self, name, x, gy):
        import torch

        gy = gy.reshape(x.shape[0], -1, gy.shape[-1])  # [B, T, out]
        g = torch.bmm(gy.transpose(1, 2), x)  # [B, out, in]: one weight gradient per sample
        self.acc[name] += abs_sum(g, by_norm=g.is_cuda)

    def scores(self, nsamples):
        for name, m in self.modules.items():
            yield name, self.acc[name].mul_(m.weight.detach().abs())  # in place: no second fp32 [out, in]


def abs_sum(g, by_norm: bool):
    """Σ_b |g_b| in fp32 over dim 0 of g [B, out, in] (g may be overwritten). On CUDA as one
    ord-1 norm, a single read of g; on CPU that norm is ~3x slower than abs_ and a sum."""
    import torch

    if by_norm:
        return torch.linalg.vector_norm(g, ord=1, dim=0, dtype=torch.float32)
    return g.abs_().sum(0, dtype=torch.float32)


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


def response_loss(logits, labels):
    """Σ_s mean_t CE over response tokens, in fp32. logits [B, T, V]; labels [B, T], -100 = ignore."""
    import torch
    import torch.nn.functional as F

    target = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    sel = target != -100
    lg = logits[:, :-1][sel].float()  # [N, V]: only predicted response tokens leave the model dtype
    ce = F.cross_entropy(lg, target[sel], reduction="none")  # [N]
    count = sel.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    weight = (1.0 / count).expand_as(sel)[sel]  # [N]: 1 / (response tokens of its sample)
    return torch.dot(ce, weight.to(ce.dtype))
