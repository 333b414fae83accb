"""Synthetic score files for a checkpoint: random dense scores ranked per docs/design.md §3, for select/patch tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from spinctl.io.checkpoint import open_checkpoint
from spinctl.io.formats import keep_count, score_meta, write_scores


def scored_names(ck, pattern: str = "mlp") -> list[str]:
    return sorted(n for n, t in ck.tensors.items() if pattern in n and n.endswith(".weight") and len(t.shape) == 2)


def dense_scores(
    model: Path, seed: int, levels: int | None = None, names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """name -> random non-negative float32 scores [n]; `levels` draws from a few values (ties, zeros)."""
    ck = open_checkpoint(model)
    rng = np.random.default_rng(seed)
    out = {}
    for name in names or scored_names(ck):
        n = math.prod(ck.tensors[name].shape)
        out[name] = rng.integers(0, levels, n).astype(np.float32) if levels else rng.random(n, dtype=np.float32)
    return out


def write_dense(model: Path, out: Path, dense: dict[str, np.ndarray], keep: float, seed: int = 0) -> Path:
    """Rank with the §1 rules (score desc, index asc, zeros out), keep ceil(keep·n), write a score file."""
    ck = open_checkpoint(model)
    entries = {}
    for name, s in dense.items():
        order = np.lexsort((np.arange(len(s)), -s))
        order = order[s[order] > 0][: keep_count(keep, len(s))]
        entries[name] = (order.astype(np.int64), s[order])
    shapes = {name: list(ck.tensors[name].shape) for name in dense}
    meta = score_meta(
        method="snip",
        nsamples=8,
        seed=seed,
        keep=keep,
        targets="mlp",
        max_length=64,
        dtype="float32",
        dataset_sha256="0" * 64,
        dataset_rows=8,
        fingerprint=ck.fingerprint(),
        shapes=shapes,
    )
    write_scores(out, entries, meta)
    return out


def fake_scores(
    model: Path, out: Path, seed: int, keep: float = 0.05, levels: int | None = None, names: list[str] | None = None
) -> Path:
    return write_dense(model, out, dense_scores(model, seed, levels, names), keep, seed)
