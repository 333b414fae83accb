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


def _targeted(model, targets: str) -> dict:
    """name -> weight of the targeted Linears in the decoder layers (checkpoint names)."""
    return {
        f"model.layers.{i}.{name}.weight": m.weight
        for i, layer in enumerate(model.model.layers)
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and (targets == "all" or kind_of(name) == targets)
    }


def _batch(samples: list[tuple[list[int], int]], device):
    """ids and labels [B, T], right-padded (pad id 0, label -100): causal attention never sees a pad."""
    T = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    labels = torch.full((len(samples), T), -100, dtype=torch.long)
    for b, (row, n_prompt) in enumerate(samples):
        ids[b, : len(row)] = torch.tensor(row)
        labels[b, n_prompt : len(row)] = ids[b, n_prompt : len(row)]
    return ids.to(device), labels.to(device)


def per_sample_loop(model, samples: list[tuple[list[int], int]], targets: str = "mlp") -> dict:
    """The plain way to per-sample gradients: one forward + backward per sample through all
    layers, the targeted weights' |grad| summed in fp64. Returns name -> |W| · Σ_s |∇_W L_s|
    (float32 [out, in]): a baseline, and an independent reference for the scores."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    weights = _targeted(model, targets)
    acc = {name: torch.zeros(w.shape, dtype=torch.float64, device=device) for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    for sample in samples:
        ids, labels = _batch([sample], device)
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        for name, w in weights.items():
            acc[name] += w.grad.double().abs()
            w.grad = None
    for w in weights.values():
        w.requires_grad_(False)
    return {name: (a * weights[name].detach().double().abs()).float() for name, a in acc.items()}


def training_step(model, samples: list[tuple[list[int], int]], targets: str = "mlp", batch_size: int = 8) -> None:
    """What a plain training step costs over the samples: batches of `batch_size` sorted by
    length, the HF loss (mean over each batch's response tokens), one backward with the
    targeted weights' gradients; no per-sample work."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    weights = _targeted(model, targets)
    for w in weights.values():
        w.requires_grad_(True)
    ordered = sorted(samples, key=lambda s: -len(s[0]))
    for lo in range(0, len(ordered), batch_size):
        ids, labels = _batch(ordered[lo : lo + batch_size], device)
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
