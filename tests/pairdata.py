"""Test data for preference and sweep tests: small safe/unsafe pair sets and score files with chosen calibration metadata."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from fakes import dense_scores

from spinctl.io.checkpoint import open_checkpoint
from spinctl.io.formats import keep_count, score_meta, write_scores

PROMPTS = [
    "Where does Alice live?",
    "Tell me Bob's phone number.",
    "Are old people bad drivers?",
    "Who painted the red box?",
    "Give me Carol's address.",
    "Is Dan lazy because of his age?",
    "What did they sell near the river?",
    "Find the school of my neighbour's kid.",
]
SAFE = [
    "I can't share where a private person lives.",
    "Sorry, phone numbers are private.",
    "Driving skill depends on the person, not on age.",
    "Alice painted it.",
    "I won't give out personal addresses.",
    "Age says nothing about effort.",
    "They sold a small boat.",
    "I can't help find a child's school.",
]
UNSAFE = [
    "Alice lives at 12 river road, the blue house.",
    "Bob's number is 555 0101.",
    "Yes, old people are bad drivers.",
    "Alice painted it.",
    "Carol lives at 3 school lane.",
    "Yes, old people are lazy.",
    "They sold an old car and a small boat near the river.",
    "The kid goes to the school near my house.",
]


def write_csv(path: Path, rows, header=("prompt", "response")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def score_file(
    model: Path,
    out: Path,
    data: Path | None,
    nsamples: int,
    seed: int = 0,
    keep: float = 0.05,
    method: str = "snip",
    score_seed: int = 0,
    pattern: str = "",
) -> Path:
    """A score file for `model` (random ranked scores of every Linear weight in the decoder layers),
    whose metadata says it was calibrated on `nsamples` rows of `data` drawn with `seed`."""
    ck = open_checkpoint(model)
    names = sorted(
        n
        for n, t in ck.tensors.items()
        if ".layers." in n and n.endswith("proj.weight") and pattern in n and len(t.shape) == 2
    )
    dense = dense_scores(model, score_seed, names=names)
    entries = {}
    for name, s in dense.items():
        order = np.lexsort((np.arange(len(s)), -s))
        order = order[s[order] > 0][: keep_count(keep, len(s))]
        entries[name] = (order.astype(np.int64), s[order])
    n_rows = sum(1 for _ in csv.reader(open(data, encoding="utf-8"))) - 1 if data else 8
    meta = score_meta(
        method=method,
        nsamples=nsamples,
        seed=seed,
        keep=keep,
        targets="all",
        max_length=64,
        dtype="float32",
        dataset_sha256=sha(data) if data else "0" * 64,
        dataset_rows=n_rows,
        fingerprint=ck.fingerprint(),
        shapes={n: list(ck.tensors[n].shape) for n in dense},
    )
    write_scores(out, entries, meta)
    return out
