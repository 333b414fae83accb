"""Selection (docs/design.md §4): which weights to zero, from a retain score file and coupled ones."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from spinctl.config import Mode, SelectConfig
from spinctl.errors import InputError, OutputError
from spinctl.io.files import file_sha256, refuse_input_as_output
from spinctl.io.formats import ScoreFile, check_replaceable, read_scores, top_count, write_selection


def _top_set(f: ScoreFile, name: str, fraction: float) -> np.ndarray:
    from spinctl_kernels import prefix_set

    k = top_count(fraction, math.prod(f.shapes[name]))
    return prefix_set(f.indices[name], f.scores[name], k)


def select_paper(retain: ScoreFile, couple: list[ScoreFile], name: str, p: float, q: float) -> np.ndarray:
    from spinctl_kernels import difference_sorted, intersect_sorted

    chosen = _top_set(couple[0], name, q)
    for c in couple[1:]:
        chosen = intersect_sorted(chosen, _top_set(c, name, q))
    return difference_sorted(chosen, _top_set(retain, name, p))


def select_reference(retain: ScoreFile, couple: list[ScoreFile], name: str, p: float, q: float) -> np.ndarray:
    """Position i is kept when uA[i] and uB[i] are both outside top_p(R); returns uA[keep]."""
    from spinctl_kernels import isin_sorted

    ua, ub = _top_set(couple[0], name, q), _top_set(couple[1], name, q)
    r = _top_set(retain, name, p)
    n = min(len(ua), len(ub))  # positions past the shorter array's end are not selected
    keep = ~isin_sorted(ua[:n], r) & ~isin_sorted(ub[:n], r)
    return ua[:n][keep]


SELECTORS = {Mode.paper: select_paper, Mode.reference: select_reference}


def check_compatible(retain: ScoreFile, couple: list[ScoreFile], p: float, q: float) -> None:
    """Same model, same tensors, and p/q within what each file kept."""
    for f in couple:
        if f.meta["fingerprint"] != retain.meta["fingerprint"]:
            raise InputError(f"{f.path}: scored a different model than {retain.path} (fingerprints differ)")
        if f.shapes != retain.shapes:
            name = min(n for n in set(f.shapes) | set(retain.shapes) if f.shapes.get(n) != retain.shapes.get(n))
            raise InputError(f"{f.path}: tensor {name} differs from {retain.path}; score both with the same --targets")
    for f, frac, label in [(retain, p, "p")] + [(c, q, "q") for c in couple]:
        if frac > f.keep:
            raise InputError(
                f"{f.path}: kept only the top {f.keep} of each tensor, below --{label} {frac}; rescore with --keep {frac} or more"
            )


def select(
    retain: ScoreFile, couple: list[ScoreFile], p: float, q: float, mode: Mode = Mode.paper
) -> dict[str, np.ndarray]:
    """name -> sorted int64 flat indices to zero, for every scored tensor.

    Args:
        retain: The retain (general-capability) score file.
        couple: The coupled score files, at least one; `Mode.reference` takes exactly two,
            privacy then fairness (checked by `SelectConfig`, not here).
        p: Fraction of each tensor in the retain top set, k = floor(p · n).
        q: Fraction of each tensor in each coupled top set.
        mode: `Mode.paper` (set intersection minus the retain set) or `Mode.reference` (the
            official code's positional AND); docs/design.md §4.

    Returns:
        A dict with one entry per tensor of `retain`, in name order: tensor name -> sorted,
        unique int64 flat indices (row-major in [out, in]); empty where nothing is selected.

    Raises:
        InputError: A coupled file scored another model or other tensors than `retain`, or
            `p` (`q`) exceeds the `keep` of the retain (a coupled) file.
        ValueError: `mode` is not a Mode value.
    """
    check_compatible(retain, couple, p, q)
    fn = SELECTORS[Mode(mode)]
    return {name: fn(retain, couple, name, p, q) for name in sorted(retain.shapes)}


def run_select(cfg: SelectConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Read the score files, select, and return (selected, selection-file metadata).

    Args:
        cfg: The score files, `p`, `q` and the mode.

    Returns:
        A tuple `(selected, meta)`: `selected` as `select` returns it; `meta` the selection
        file's metadata without `format`, `kind` and `version` (`mode`, `p`, `q`,
        `retain_sha256`, `couple_sha256`, `fingerprint`, `shapes`), ready for
        `write_selection`.

    Raises:
        InputError: A score file is missing, is not a valid score file, or does not match
            the others or `p`/`q` (see `select`).
    """
    retain = read_scores(cfg.retain)
    couple = [read_scores(c) for c in cfg.couple]
    selected = select(retain, couple, cfg.p, cfg.q, cfg.mode)
    meta = {
        "mode": Mode(cfg.mode).value,
        "p": cfg.p,
        "q": cfg.q,
        "retain_sha256": file_sha256(cfg.retain),
        "couple_sha256": [file_sha256(c) for c in cfg.couple],
        "fingerprint": retain.meta["fingerprint"],
        "shapes": retain.shapes,
    }
    return selected, meta


def select_to_file(cfg: SelectConfig, output: Path) -> dict:
    """Select from the score files of `cfg` and write the selection file `output` atomically.

    Args:
        cfg: The score files, `p`, `q` and the mode.
        output: The selection file to write (.safetensors); missing parent directories are
            created.

    Returns:
        The summary: `file`, `mode`, `p`, `q`, `tensors`, `tensors_touched`, `selected`
        (elements in all) and `per_tensor` (tensor name -> selected count).

    Raises:
        OutputError: `output` is one of the input score files, an existing file that is not
            a selection file, or it or its directory cannot be written.
        InputError: As `run_select`.
    """
    refuse_input_as_output(output, (cfg.retain, *cfg.couple))  # also through a symlink or a hard link
    check_replaceable(output, "selection")
    selected, meta = run_select(cfg)
    try:  # as `score -o`: missing parent directories are made, once there is something to write
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{output}: cannot create its directory ({e.strerror})") from None
    write_selection(output, selected, meta)
    return summary(selected, meta, output)


def summary(selected: dict[str, np.ndarray], meta: dict, output: Path | None) -> dict:
    counts = {n: int(len(a)) for n, a in selected.items()}
    return {
        "file": str(output) if output else None,
        "mode": meta["mode"],
        "p": meta["p"],
        "q": meta["q"],
        "tensors": len(counts),
        "tensors_touched": sum(1 for c in counts.values() if c),
        "selected": sum(counts.values()),
        "per_tensor": counts,
    }
