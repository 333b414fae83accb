"""Perplexity of a model on a text file: a quick check that surgery left language modelling intact."""

from __future__ import annotations

import math
import time
from pathlib import Path

from .devices import check_device
from .errors import InputError, UsageError


def split_windows(n_tokens: int, seqlen: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows of `seqlen` tokens; a final window is kept when it
    has at least 2 tokens (one predicted token), so nothing scoreable is thrown away."""
    spans = [(s, min(s + seqlen, n_tokens)) for s in range(0, n_tokens, seqlen)]
    return [(s, e) for s, e in spans if e - s >= 2]


def read_text(text_path: str | Path) -> str:
    path = Path(text_path)
    if not path.is_file():
        raise InputError(f"text file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"text file {path} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"text file {path} is empty")
    return text


def perplexity(model_dir: str | Path, text_path: str | Path, seqlen: int = 2048,
               device: str = "auto", dtype: str = "auto", batch_size: int = 1) -> dict:
    """exp(mean NLL) over every predicted token of the file, windows scored independently.

    The text is tokenized in one go with the tokenizer's usual special tokens (so a BOS,
    where the model has one, opens the first window only), the same as the common
    WikiText-2 recipe.
    """
    import torch

    from .evaluate import load_causal_lm

    from .evaluate import DTYPES

    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {seqlen}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    check_device(device)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    text = read_text(text_path)
    model, tok = load_causal_lm(model_dir, device, dtype)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise InputError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings "
                         f"({max_pos}) in {model_dir}; pass --seqlen {max_pos} or less")
    # verbose=False: the "longer than model_max_length" warning is expected here, we window.
    ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0]  # [N]
    if ids.numel() < 2:
        raise InputError(f"text file {text_path} has {ids.numel()} token(s); need at least 2")
    windows = split_windows(ids.numel(), seqlen)
    dev = next(model.parameters()).device

    total_nll, total_pred = 0.0, 0
    # Windows of equal length batch together (all full ones; the short tail on its own).
    groups: dict[int, list[tuple[int, int]]] = {}
    for s, e in windows:
        groups.setdefault(e - s, []).append((s, e))
    with torch.inference_mode():
        for length, spans in groups.items():
            for b in range(0, len(spans), batch_size):
                chunk = spans[b:b + batch_size]
                x = torch.stack([ids[s:e] for s, e in chunk]).to(dev)  # [B, L]
                logits = model(input_ids=x).logits                      # [B, L, V]
                # fp32 log-softmax whatever the model dtype; position t predicts token t+1.
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    x[:, 1:].reshape(-1), reduction="sum")
                total_nll += float(nll)
                total_pred += len(chunk) * (length - 1)
                del logits
    mean = total_nll / total_pred
    return {
        "model": str(model_dir),
        "file": str(text_path),
        "tokens": int(ids.numel()),
        "windows": len(windows),
        "seqlen": seqlen,
        "nll": mean,
        "ppl": math.exp(mean),
        "seconds": round(time.perf_counter() - t0, 3),
    }
