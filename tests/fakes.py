"""Synthetic score files for a checkpoint: random ranked top-K entries, for select/patch tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from spinctl.checkpoint import open_checkpoint
from spinctl.formats import keep_count, score_meta, write_scores


def scored_names(ck, pattern: str = "mlp") -> list[str]:
    return sorted(n for n, t in ck.tensors.items() if pattern in n and n.endswith(".weight") and len(t.shape) == 2)


def fake_scores(model: Path, out: Path, seed: int, keep: float = 0.05, levels: int | None = None,
                names: list[str] | None = None) -> Path:
    """A valid score file: dense random scores per tensor, ranked with the §1 rules.

    `levels` draws scores from a few values so ties are frequent; zeros are left out.
    """
    ck = open_checkpoint(model)
    rng = np.random.default_rng(seed)
    names = names or scored_names(ck)
    entries, shapes = {}, {}
    for name in names:
        shape = list(ck.tensors[name].shape)
        n = math.prod(shape)
        s = rng.integers(0, levels, n).astype(np.float32) if levels else rng.random(n, dtype=np.float32)
        order = np.lexsort((np.arange(n), -s))
        order = order[s[order] > 0][: keep_count(keep, n)]
        entries[name] = (order.astype(np.int64), s[order])
        shapes[name] = shape
    meta = score_meta(method="snip", nsamples=8, seed=seed, keep=keep, targets="mlp", max_length=64,
                      dtype="float32", dataset_sha256="0" * 64, dataset_rows=8,
                      fingerprint=ck.fingerprint(), shapes=shapes)
    write_scores(out, entries, meta)
    return out
