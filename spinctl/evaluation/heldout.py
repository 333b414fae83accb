"""Held-out rows: which rows of a data file a score file was calibrated on, so evaluation keeps off them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl.errors import InputError
from spinctl.io import untrusted


@dataclass(frozen=True)
class Calibrated:
    """What a score file's metadata says about its calibration data (docs/design.md §5)."""

    path: Path
    method: str
    dataset_sha256: str
    dataset_rows: int
    nsamples: int
    seed: int


def read_calibrated(path: str | Path) -> Calibrated:
    """The calibration facts of a score file; reads the header only, not the arrays."""
    from spinctl.io.checkpoint import read_shard

    path = Path(path)
    shard = read_shard(path)
    try:
        meta = untrusted.loads((shard.metadata or {})["spinctl"])
    except (KeyError, ValueError):
        raise InputError(f"{path}: not a spinctl score file (no spinctl metadata)") from None
    if not isinstance(meta, dict) or meta.get("kind") != "scores":
        raise InputError(
            f"{path}: expected a score file, found kind {meta.get('kind') if isinstance(meta, dict) else None!r}"
        )
    fields = {"dataset_sha256": str, "dataset_rows": int, "nsamples": int, "seed": int}
    for key, typ in fields.items():
        v = meta.get(key)
        if not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v < 0):  # a seed of -1 broke numpy
            raise InputError(f"{path}: metadata lacks a valid {key}; rescore it with this spinctl")
    return Calibrated(
        path, str(meta.get("method", "?")), meta["dataset_sha256"], meta["dataset_rows"], meta["nsamples"], meta["seed"]
    )


def picked_rows(cal: Calibrated, rows) -> np.ndarray | None:
    """Row numbers of `rows` (a data.Rows) that `cal` was scored on, or None if it was scored on another file.

    The file is recognised by the sha256 of its bytes; then the picked rows are exactly
    `default_rng(seed).permutation(dataset_rows)[:nsamples]` (data.select_rows).
    """
    from spinctl.scoring.data import select_rows

    if cal.dataset_sha256 != rows.sha256:
        return None
    if cal.dataset_rows != rows.count:
        raise InputError(
            f"{cal.path}: says its data had {cal.dataset_rows} rows, {rows.path} (same sha256) reads as "
            f"{rows.count}; read it with the same --prompt-column/--response-column it was scored with"
        )
    return select_rows(rows.count, cal.nsamples, cal.seed, rows.path)


def heldout_rows(rows, calibrated: list[Calibrated] | tuple[Calibrated, ...]) -> np.ndarray:
    """Row numbers of `rows` not picked by any of the score files scored on this file, ascending."""
    used = np.zeros(rows.count, dtype=bool)
    for cal in calibrated:
        picked = picked_rows(cal, rows)
        if picked is not None:
            used[picked] = True
    return np.flatnonzero(~used).astype(np.int64)
