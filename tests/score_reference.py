"""Slow, plainly written reference scores for the tests: one sample at a time, float64, full tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def encode(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """docs/design.md §2 written out: prompt with special tokens, response without, cut at the end."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = (p + r)[:max_length]
    return ids, min(len(p), len(ids))


def load_float64(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, local_files_only=True)
    model.eval()
    return model


def linear_weights(model) -> dict[str, nn.Linear]:
    """Every nn.Linear inside model.model.layers, by weight name (callers filter by target)."""
    return {
        f"{name}.weight": m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("model.layers.")
    }


def reference_snip(model, samples: list[tuple[list[int], int]]) -> dict[str, np.ndarray]:
    """|W| * sum over samples of |dL_s/dW|, L_s = mean CE over the sample's response tokens."""
    weights = linear_weights(model)
    model.requires_grad_(False)
    for m in weights.values():
        m.weight.requires_grad_(True)
    total = {name: torch.zeros_like(m.weight) for name, m in weights.items()}
    for ids, n_prompt in samples:
        labels = list(ids)
        for t in range(n_prompt):
            labels[t] = -100
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
        losses = []
        for t in range(len(ids) - 1):
            if labels[t + 1] != -100:
                losses.append(torch.nn.functional.cross_entropy(logits[t], torch.tensor(labels[t + 1])))
        if not losses:
            continue
        loss = torch.stack(losses).mean()
        model.zero_grad()
        loss.backward()
        for name, m in weights.items():
            total[name] += m.weight.grad.abs()
    model.requires_grad_(False)
    return {name: (m.weight.detach().abs() * total[name]).numpy() for name, m in weights.items()}


def reference_wanda(model, samples: list[tuple[list[int], int]]) -> dict[str, np.ndarray]:
    """|W| * sqrt(sum over samples and response positions of x^2 / N)."""
    weights = linear_weights(model)
    sums = {name: torch.zeros(m.weight.shape[1], dtype=torch.float64) for name, m in weights.items()}
    current = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0][0]  # [T, in]
            for t in range(x.shape[0]):
                if t >= current["n_prompt"]:
                    sums[name] += x[t] ** 2

        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in weights.items()]
    n = 0
    with torch.no_grad():
        for ids, n_prompt in samples:
            if len(ids) <= max(n_prompt, 1):
                continue
            current["n_prompt"] = n_prompt
            model(input_ids=torch.tensor([ids]))
            n += 1
    for h in handles:
        h.remove()
    return {
        name: (m.weight.detach().abs() * torch.sqrt(sums[name] / n)[None, :]).numpy() for name, m in weights.items()
    }


def reference_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k largest positive scores, ties by smaller index, rank order."""
    flat = scores.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
    return np.array([i for i in order[:k] if flat[i] > 0], dtype=np.int64)
