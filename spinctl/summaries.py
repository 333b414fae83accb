"""Summaries of a score file, a selection file or a checkpoint, for `spinctl inspect`."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from spinctl.io import untrusted
from spinctl.io.checkpoint import open_checkpoint, read_shard
from spinctl.io.formats import read_scores, read_selection
from spinctl.io.sidecars import sidecar_paths


def _kind(path: Path) -> str:
    if path.is_dir():
        return "checkpoint"
    meta = read_shard(path).metadata or {}
    try:
        return untrusted.loads(meta["spinctl"])["kind"]
    except (KeyError, ValueError, TypeError):
        return "checkpoint"


def inspect(path: Path) -> dict:
    path = Path(path)
    kind = _kind(path) if path.exists() else "checkpoint"  # open_checkpoint names the missing path
    if kind == "scores":
        f = read_scores(path)
        meta = {k: v for k, v in f.meta.items() if k != "shapes"}
        entries = {n: len(a) for n, a in f.indices.items()}
        top = {n: float(s[0]) for n, s in f.scores.items() if len(s)}
        return {
            "kind": kind,
            "file": str(path),
            "meta": meta,
            "tensors": len(entries),
            "entries": sum(entries.values()),
            "max_score": max(top.values(), default=None),
        }
    if kind == "selection":
        f = read_selection(path)
        counts = {n: int(len(a)) for n, a in f.indices.items()}
        meta = {k: v for k, v in f.meta.items() if k != "shapes"}
        return {
            "kind": kind,
            "file": str(path),
            "meta": meta,
            "tensors": len(counts),
            "selected": sum(counts.values()),
            "per_tensor": {n: c for n, c in counts.items() if c},
        }
    ck = open_checkpoint(path)
    manifest, undo = sidecar_paths(path)
    dtypes = Counter(t.dtype for t in ck.tensors.values())
    return {
        "kind": "checkpoint",
        "path": str(path),
        "fingerprint": ck.fingerprint(),
        "shards": len(ck.shards),
        "tensors": len(ck.tensors),
        "parameters": sum(math.prod(t.shape) for t in ck.tensors.values()),
        "bytes": sum(s.size for s in ck.shards),
        "dtypes": dict(sorted(dtypes.items())),
        "patched": manifest.exists(),
        "undo_log": undo.exists(),
    }
