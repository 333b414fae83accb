"""Forward-only negative log-likelihoods on a loaded causal LM: per-sample response NLL, text windows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from spinctl.errors import InputError

Progress = Callable[[int], None]


class ResponseNLL(NamedTuple):
    mean: np.ndarray  # float64 [N]: mean NLL (nats) over each sample's response tokens
    tokens: np.ndarray  # int64 [N]: response tokens predicted per sample


def response_nll(
    model,
    tok,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 8,
    max_length: int = 2048,
    chat_template: bool = True,
    progress: Progress | None = None,
) -> ResponseNLL:
    """Per-sample mean NLL of `responses[i]` given `prompts[i]`, in input order.

    Tokens exactly as `data.tokenize` builds them for scoring: with `chat_template` the prompt
    is the user turn of the tokenizer's chat template plus the generation prompt, the response
    tokens are appended without special tokens; the loss covers response tokens only (the
    prompt carries label -100), with the usual shift. Batches hold similar lengths, padded on
    the right and run without an attention mask: under causal attention a real token only
    sees earlier positions, all real, so padding never changes a real token's logits' maths.
    Same inputs and batch size give the same batches, hence bit-equal results on one device.
    """
    from spinctl.scoring.data import has_response, tokenize

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    if chat_template and not getattr(tok, "chat_template", None):
        raise InputError(
            f"{getattr(tok, 'name_or_path', 'the tokenizer')}: tokenizer has no chat template, which "
            f"prompts are rendered with here; add one (chat_template.jinja) to the model directory"
        )
    encoded = tokenize(tok, list(prompts), list(responses), max_length, chat_template)
    for i, (ids, n_prompt) in enumerate(encoded):
        if not has_response(ids, n_prompt):
            raise InputError(
                f"sample {i + 1} ({prompts[i][:40]!r}…) has no response token within "
                f"{max_length} tokens: its response is empty or the prompt too long (raise --max-length)"
            )
    return encoded_nll(model, encoded, batch_size, progress)


def encoded_nll(
    model, encoded: Sequence[tuple[Sequence[int], int]], batch_size: int = 8, progress: Progress | None = None
) -> ResponseNLL:
    """response_nll on already tokenized (ids, n_prompt) samples; see there."""
    import torch

    n = len(encoded)
    mean = np.zeros(n, dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    # Stable sort by length: deterministic batches with little padding.
    order = sorted(range(n), key=lambda i: len(encoded[i][0]))
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            x = torch.zeros((len(idx), width), dtype=torch.long)  # [B, T], right padded with id 0
            labels = torch.full((len(idx), width), -100, dtype=torch.long)  # [B, T]
            for row, i in enumerate(idx):
                ids, n_prompt = encoded[i]
                x[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                labels[row, n_prompt : len(ids)] = x[row, n_prompt : len(ids)]
            logits = model(input_ids=x.to(device)).logits  # [B, T, V]
            target = labels[:, 1:].to(device)  # [B, T-1]: position t predicts t+1
            for row, i in enumerate(idx):
                # One row at a time: a [T, V] fp32 log-softmax, not [B, T, V], stays small for big vocabularies.
                nll = torch.nn.functional.cross_entropy(
                    logits[row, :-1].float(), target[row], ignore_index=-100, reduction="none"
                )  # [T-1]
                k = int((target[row] != -100).sum())
                mean[i] = float(nll.double().sum()) / k
                count[i] = k
            del logits
            if progress is not None:
                progress(len(idx))
    return ResponseNLL(mean, count)


def window_nll(model, ids, windows: Sequence[tuple[int, int]], batch_size: int = 1) -> tuple[float, int]:
    """(summed NLL, predicted tokens) of token windows of `ids` [N], each window scored on its own."""
    import torch

    device = next(model.parameters()).device
    total_nll, total_pred = 0.0, 0
    # Windows of equal length batch together (all full ones; the short tail on its own).
    groups: dict[int, list[tuple[int, int]]] = {}
    for s, e in windows:
        groups.setdefault(e - s, []).append((s, e))
    with torch.inference_mode():
        for length, spans in groups.items():
            for b in range(0, len(spans), batch_size):
                chunk = spans[b : b + batch_size]
                x = torch.stack([ids[s:e] for s, e in chunk]).to(device)  # [B, L]
                logits = model(input_ids=x).logits  # [B, L, V]
                # fp32 log-softmax whatever the model dtype; position t predicts token t+1.
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += float(nll)
                total_pred += len(chunk) * (length - 1)
                del logits
    return total_nll, total_pred
