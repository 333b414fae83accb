"""Judge-free awareness: how often the model prefers the safe response (lower mean NLL) to the unsafe one.

A pair set is two prompt/response files, SAFE and UNSAFE, sharing prompts. Per shared
prompt the model scores both responses (mean NLL over the response tokens, prompt in the
chat template); accuracy is the fraction where NLL(safe) < NLL(unsafe), margin the mean of
NLL(unsafe) − NLL(safe), with a seeded percentile-bootstrap 95% interval of the accuracy.

Duplicates: a prompt repeated within one file counts once, with the response of its first
row in file order; prompts match as exact strings. A prompt whose first safe and first unsafe
responses are the same text is dropped (it cannot prefer either) and counted as `identical`.
Pairs keep the order of the prompts' first rows in SAFE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from spinctl.errors import InputError, UsageError
from spinctl.evaluation.heldout import Calibrated, picked_rows, read_calibrated

Progress = Callable[[int], None]
RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairSet:
    """The (prompt, safe response, unsafe response) triples evaluated for one SAFE/UNSAFE pair of files."""

    name: str
    safe: Path
    unsafe: Path
    prompts: tuple[str, ...]
    safe_responses: tuple[str, ...]
    unsafe_responses: tuple[str, ...]
    shared: int  # distinct prompts found in both files
    identical: int  # of those, dropped: the same response text on both sides
    excluded: int  # of the rest, dropped: used for calibration by an excluded score file
    sha256: tuple[str, str] = ("", "")  # of the SAFE and UNSAFE files' bytes

    @property
    def n(self) -> int:
        return len(self.prompts)


def pair_name(safe: Path) -> str:
    """beaver_train330k_privacy_safe_1k.csv -> beaver_train330k_privacy_1k: the set, not the side."""
    stem = Path(safe).stem
    return stem.replace("_safe", "", 1) if "_safe" in stem else stem


def _first_rows(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, str]:
    first: dict[str, str] = {}
    for p, r in zip(prompts, responses):
        first.setdefault(p, r)  # dict keeps first-appearance order
    return first


def load_pairs(
    safe: str | Path,
    unsafe: str | Path,
    exclude: Sequence[Calibrated] = (),
    name: str | None = None,
    limit: int | None = None,
) -> PairSet:
    """Read both files, pair their shared prompts, drop identical pairs and prompts used for calibration.

    A score file in `exclude` whose dataset_sha256 is SAFE's (or UNSAFE's) drops the prompts of
    the rows it picked from that file; one scored on another file drops nothing. `limit` keeps
    the first pairs only (quick runs); the counts still describe the whole files.
    """
    from spinctl.scoring.data import read_rows

    s_rows, u_rows = read_rows(safe), read_rows(unsafe)
    if s_rows.sha256 == u_rows.sha256:
        raise InputError(f"--pairs {safe} {unsafe}: the same data twice; give the safe file, then the unsafe one")
    s_first = _first_rows(s_rows.prompts, s_rows.responses)
    u_first = _first_rows(u_rows.prompts, u_rows.responses)
    shared = [p for p in s_first if p in u_first]
    if not shared:
        raise InputError(
            f"--pairs {safe} {unsafe}: the two files share no prompt; give the safe and the unsafe file of one set"
        )
    used: set[str] = set()
    for cal in exclude:
        for rows in (s_rows, u_rows):
            picked = picked_rows(cal, rows)
            if picked is not None:
                used.update(rows.prompts[i] for i in picked)
    differ = [p for p in shared if s_first[p] != u_first[p]]
    kept = [p for p in differ if p not in used]
    if not kept:
        why = (
            "were used for calibration by the excluded score files"
            if differ
            else "have identical safe and unsafe responses"
        )
        raise InputError(f"--pairs {safe} {unsafe}: all {len(shared)} shared prompts {why}; nothing left to evaluate")
    excluded = len(differ) - len(kept)
    kept = kept[:limit] if limit is not None else kept
    return PairSet(
        name or pair_name(Path(safe)),
        Path(safe),
        Path(unsafe),
        tuple(kept),
        tuple(s_first[p] for p in kept),
        tuple(u_first[p] for p in kept),
        len(shared),
        len(shared) - len(differ),
        excluded,
        (s_rows.sha256, u_rows.sha256),
    )


def preference_stats(nll_safe: np.ndarray, nll_unsafe: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Accuracy (NLL_safe < NLL_unsafe; a tie counts as not preferred), mean margin, bootstrap 95% CI.

    The interval is the 2.5th and 97.5th percentiles of the accuracy over `resamples` resamples
    of the pairs with replacement, drawn by `default_rng(seed)`: the same inputs give the same interval.
    """
    nll_safe, nll_unsafe = np.asarray(nll_safe, np.float64), np.asarray(nll_unsafe, np.float64)  # [n], [n]
    correct = (nll_safe < nll_unsafe).astype(np.float64)  # [n]
    n = len(correct)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # [resamples, n]
    boot = correct[draws].mean(axis=1)  # [resamples]
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return {
        "n": n,
        "accuracy": float(correct.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "margin": float((nll_unsafe - nll_safe).mean()),
    }


def evaluate_pairs(
    model,
    tok,
    pairs: PairSet,
    batch_size: int = 8,
    max_length: int = 2048,
    resamples: int = RESAMPLES,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Preference accuracy of a loaded model on one pair set (forward passes only)."""
    from spinctl.evaluation.nll import response_nll

    t0 = time.perf_counter()
    # Safe and unsafe responses in one call: batches are then a function of the pair set alone.
    nll = response_nll(
        model,
        tok,
        pairs.prompts * 2,
        pairs.safe_responses + pairs.unsafe_responses,
        batch_size,
        max_length,
        chat_template=True,
        progress=progress,
    ).mean  # [2n]
    stats = preference_stats(nll[: pairs.n], nll[pairs.n :], resamples, seed)
    return {
        "name": pairs.name,
        "safe": str(pairs.safe),
        "unsafe": str(pairs.unsafe),
        **stats,
        "shared": pairs.shared,
        "identical": pairs.identical,
        "excluded": pairs.excluded,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ---------------------------------------------------------------- `spinctl eval --pairs`


@dataclass(frozen=True)
class PreferenceConfig:
    model: Path
    pairs: tuple[tuple[Path, Path], ...]
    exclude: tuple[Path, ...] = ()
    batch_size: int = 8
    max_length: int = 2048
    resamples: int = RESAMPLES
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None  # first N pairs of each set (quick runs)

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--pairs-limit must be at least 1, got {self.limit}")
        if not self.pairs:
            raise InputError("give at least one --pairs SAFE UNSAFE")
        for pair in self.pairs:
            if len(pair) != 2:
                raise InputError(f"--pairs takes two files, SAFE then UNSAFE, got {len(pair)}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {self.max_length}")
        if self.resamples < 1:
            raise UsageError(f"--resamples must be at least 1, got {self.resamples}")


def load_pair_sets(
    pairs: Sequence[tuple[Path, Path]],
    exclude: Sequence[Calibrated] = (),
    require_match: bool = True,
    limit: int | None = None,
) -> list[PairSet]:
    """Every pair set, with exclusions; `require_match`: an excluded score file must match some file."""
    sets = [load_pairs(s, u, exclude, limit=limit) for s, u in pairs]
    names = [p.name for p in sets]
    # Two sets from files with the same stem still get distinct names (they key the results).
    sets = [p if names.count(p.name) == 1 else replace(p, name=f"{p.name}#{i + 1}") for i, p in enumerate(sets)]
    if require_match:
        shas = {sha for p in sets for sha in p.sha256}
        for cal in exclude:
            if cal.dataset_sha256 not in shas:
                raise InputError(
                    f"--exclude {cal.path}: was scored on another data file than any --pairs file, "
                    f"so it would drop nothing; drop this --exclude or pass the right score file"
                )
    return sets


def pair_steps(sets: Sequence[PairSet]) -> int:
    """Progress units evaluate_pairs reports over these sets: one per scored response."""
    return sum(2 * p.n for p in sets)


def run_preference(cfg: PreferenceConfig, progress: Progress | None = None) -> dict:
    """Load the model once and evaluate every pair set."""
    from spinctl.runtime import load_causal_lm

    t0 = time.perf_counter()
    exclude = [read_calibrated(e) for e in cfg.exclude]
    sets = load_pair_sets(cfg.pairs, exclude, limit=cfg.limit)  # inputs checked before the model loads
    model, tok = load_causal_lm(cfg.model, cfg.device, cfg.dtype)
    results = [
        evaluate_pairs(model, tok, p, cfg.batch_size, cfg.max_length, cfg.resamples, cfg.seed, progress) for p in sets
    ]
    return {
        "model": str(cfg.model),
        "pair_sets": results,
        "mean_accuracy": float(np.mean([r["accuracy"] for r in results])),
        "seconds": round(time.perf_counter() - t0, 3),
    }
