"""The baseline for bench_score: SNIP scores the way the official SPIN code computes them, kept plain.

For every decoder layer, only that layer's Linear weights require grad, and every
sample gets its own full forward and backward (128 samples x n_layers passes); |grad|
is accumulated in the model dtype (bf16 on GPU: lossy), or in fp32 when asked.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from spinctl.io.formats import keep_count
from spinctl.scoring.engine import topk_ranked
from spinctl.scoring.targets import kind_of


def reference_loop(
    model,
    samples: list[tuple[list[int], int]],
    targets: str = "mlp",
    accumulate: str = "model",
    keep: float | None = None,
) -> dict:
    """samples: (ids, n_prompt) pairs. Returns name -> score tensor [out, in], or with `keep`
    name -> (indices, scores) top-K by the docs/design.md §3 rule (so 7B scores need not all be kept)."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    out = {}
    for i, layer in enumerate(model.model.layers):
        subset = {
            name: m
            for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and (targets == "all" or kind_of(name) == targets)
        }
        for m in subset.values():
            m.weight.requires_grad_(True)
        saved = {}
        for ids, n_prompt in samples:
            input_ids = torch.tensor([ids], device=device)
            labels = input_ids.clone()
            labels[:, :n_prompt] = -100
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            for name, m in subset.items():
                g = m.weight.grad.abs() if accumulate == "model" else m.weight.grad.float().abs()
                saved[name] = g if name not in saved else saved[name] + g
                m.weight.grad = None
        for name, m in subset.items():
            score = saved[name] * m.weight.detach().abs()
            full = f"model.layers.{i}.{name}.weight"
            if keep is None:
                out[full] = score
            else:
                flat = score.float().reshape(-1)
                out[full] = topk_ranked(flat, keep_count(keep, flat.numel()))
            m.weight.requires_grad_(False)
    return out
