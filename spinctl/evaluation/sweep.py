"""p/q sweep: for each (mode, targets, p, q), zero the selection in the loaded model, evaluate, restore exactly.

The model is loaded once. Per setting the selection is computed in memory from cached score
files (select.select, the same function `spinctl patch --retain … --couple …` uses), the
selected elements of the loaded weights are saved and set to +0.0, perplexity and preference
accuracy (optionally keyword-judged generations) are measured, and the saved values are
written back and checked bit for bit. Row 0 is the original model (nothing zeroed).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl.errors import InputError, SpinctlError, UsageError

Log = Callable[[str], None]
DEFAULT_BUDGET = 0.02


def parse_budget(text: str | float) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02: the allowed relative perplexity increase."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"--max-ppl-increase {text!r}: expected a fraction (0.02) or a percentage (2%)") from None
    if not (value >= 0 and np.isfinite(value)):
        raise UsageError(f"--max-ppl-increase {text!r} must be a non-negative number")
    return value


@dataclass(frozen=True)
class Setting:
    mode: str
    targets: str
    p: float
    q: float

    @property
    def label(self) -> str:
        return f"{self.mode} p={self.p:g} q={self.q:g} {self.targets}"


@dataclass(frozen=True)
class SweepConfig:
    model: Path
    retain: Path
    couple: tuple[Path, ...]
    p: tuple[float, ...]
    q: tuple[float, ...]
    pairs: tuple[tuple[Path, Path], ...]
    ppl_data: Path
    modes: tuple[str, ...] = ("paper",)
    targets: tuple[str, ...] = ("all",)
    ppl_rows: int = 64
    seqlen: int = 2048
    judge_prompts: tuple[Path, ...] = ()
    judge_limit: int | None = None
    judge_column: str = "questions"
    max_new_tokens: int = 64
    max_ppl_increase: float = DEFAULT_BUDGET
    batch_size: int = 8
    max_length: int = 2048
    resamples: int = 2000
    pairs_limit: int | None = None  # first N pairs of each set (quick runs)
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        from spinctl.scoring.targets import parse_spec
        from spinctl.selection import Mode

        if not self.couple:
            raise InputError("give at least one --couple score file")
        if not (self.p and self.q and self.modes and self.targets):
            raise InputError("empty grid: give at least one --p, one --q, one --mode and one --targets")
        for name, values in (("p", self.p), ("q", self.q)):
            for v in values:
                if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                    raise UsageError(f"--{name} must be a fraction in [0, 1], got {v}")
        modes = []
        for m in self.modes:
            try:
                modes.append(Mode(m.value if isinstance(m, Mode) else m).value)
            except ValueError:
                raise UsageError(f"--mode {m!r}: choose paper or reference") from None
        object.__setattr__(self, "modes", tuple(modes))
        if "reference" in modes and len(self.couple) != 2:
            raise InputError(
                f"mode reference takes exactly two --couple files (privacy, then fairness), got {len(self.couple)}"
            )
        for t in self.targets:
            parse_spec(t)
        if not self.pairs:
            raise InputError("give at least one --pairs SAFE UNSAFE: the sweep ranks settings by preference accuracy")
        # Out of range is a usage error (exit 2), as for every other command's options.
        if self.ppl_rows < 1 or self.batch_size < 1 or self.max_new_tokens < 1 or self.resamples < 1:
            raise UsageError("--ppl-rows, --batch-size, --max-new-tokens and --resamples must be at least 1")
        if self.seqlen < 2 or self.max_length < 2:
            raise UsageError("--seqlen and --max-length must be at least 2")
        if self.pairs_limit is not None and self.pairs_limit < 1:
            raise UsageError(f"--pairs-limit must be at least 1, got {self.pairs_limit}")
        if self.judge_limit is not None and self.judge_limit < 1:
            raise UsageError(f"--judge-limit must be at least 1, got {self.judge_limit}")
        if not (self.max_ppl_increase >= 0):
            raise UsageError(f"--max-ppl-increase must be non-negative, got {self.max_ppl_increase}")

    def grid(self) -> list[Setting]:
        """Every combination, mode outermost, then targets, p, q; duplicates once, first place kept."""
        combos = itertools.product(self.modes, self.targets, self.p, self.q)
        return list(dict.fromkeys(Setting(m, t, float(p), float(q)) for m, t, p, q in combos))


# ---------------------------------------------------------------- selection and in-memory surgery


def tensor_filter(names: Sequence[str], spec: str) -> set[str]:
    """The score-file tensor names a --targets value keeps (mlp|attn|all|re:REGEX, by name as in targets.py)."""
    from spinctl.scoring.targets import kind_of, parse_spec

    kind, regex = parse_spec(spec)
    if kind == "all":
        return set(names)
    if regex is not None:
        return {n for n in names if regex.search(n)}
    return {n for n in names if kind_of(n.removesuffix(".weight")) == kind}


def selection_for(retain, couple, setting: Setting) -> dict[str, np.ndarray]:
    """name -> sorted int64 flat indices [k] to zero; empty for tensors the targets filter leaves out."""
    from spinctl.selection import select

    selected = select(retain, couple, setting.p, setting.q, setting.mode)
    keep = tensor_filter(list(selected), setting.targets)
    return {n: (a if n in keep else a[:0]) for n, a in selected.items()}


def _bits(t):
    """A tensor's raw bits as integers: equality of these is bit equality (+0.0 ≠ -0.0, NaN = NaN)."""
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def check_targets(model, shapes: dict[str, list[int]], model_path: Path) -> dict:
    """name -> parameter of the loaded model, for every tensor the score files name; shapes must agree."""
    params = dict(model.named_parameters())
    out = {}
    for name, shape in shapes.items():
        t = params.get(name)
        if t is None:
            raise InputError(
                f"score files name tensor {name}, which the model loaded from {model_path} lacks; score this model"
            )
        if list(t.shape) != list(shape):
            raise InputError(
                f"tensor {name}: {list(t.shape)} in {model_path}, {shape} in the score files; score this model"
            )
        if not t.is_contiguous():
            raise SpinctlError(f"tensor {name} of {model_path} is not contiguous in memory; cannot zero by flat index")
        out[name] = t
    return out


@contextmanager
def zeroed(params: dict, selection: dict[str, np.ndarray]):
    """Set the selected elements to +0.0 for the duration of the block; restore them bit for bit after."""
    import torch

    saved = []
    with torch.no_grad():
        for name, idx in selection.items():
            if not len(idx):
                continue
            flat = params[name].data.view(-1)  # [out·in], a view: writes reach the model
            i = torch.from_numpy(np.ascontiguousarray(idx)).to(flat.device)  # [k] row-major flat indices
            saved.append((name, flat, i, flat[i].clone()))  # originals, same dtype
            flat[i] = 0.0
    try:
        yield sum(len(s[2]) for s in saved)
    finally:
        with torch.no_grad():
            for name, flat, i, orig in saved:
                flat[i] = orig
                if not torch.equal(_bits(flat[i]), _bits(orig)):
                    raise SpinctlError(
                        f"tensor {name}: restoring the zeroed weights did not give back the original bits"
                    )


def state_digest(model) -> str:
    """sha256 over every parameter's and buffer's raw bytes, in state_dict order."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        h.update(name.encode())
        t = t.detach().contiguous().cpu()
        h.update(_bits(t.reshape(-1)).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- evaluation of one state of the model


@dataclass(frozen=True)
class Probes:
    """Everything evaluated per setting, read once: ppl data, pair sets, judge prompts."""

    ppl: object  # ppl.PplData
    pair_sets: tuple  # preference.PairSet, ...
    judge: tuple[tuple[str, tuple[str, ...]], ...]  # (name, questions)


def load_probes(cfg: SweepConfig) -> Probes:
    """Read the evaluation data; the score files' calibration rows are held out of ppl and pairs."""
    from spinctl.evaluation.evaluate import load_questions
    from spinctl.evaluation.heldout import read_calibrated
    from spinctl.evaluation.ppl import load_ppl_data
    from spinctl.evaluation.preference import load_pair_sets

    calibrated = [read_calibrated(f) for f in (cfg.retain, *cfg.couple)]
    ppl = load_ppl_data(cfg.ppl_data, cfg.ppl_rows, calibrated)
    pairs = load_pair_sets(cfg.pairs, calibrated, require_match=False, limit=cfg.pairs_limit)
    judge = tuple(
        (Path(f).stem, tuple(load_questions(f, cfg.judge_column, cfg.judge_limit))) for f in cfg.judge_prompts
    )
    names = [n for n, _ in judge]
    judge = tuple((n if names.count(n) == 1 else f"{n}#{i + 1}", q) for i, (n, q) in enumerate(judge))
    return Probes(ppl, tuple(pairs), judge)


def measure(model, tok, probes: Probes, cfg: SweepConfig) -> dict:
    """ppl, per pair set accuracy/CI/margin, mean accuracy ("awareness"), judged rates: one model state."""
    from spinctl.evaluation.evaluate import awareness_rate, generate_texts
    from spinctl.evaluation.judges import KeywordJudge
    from spinctl.evaluation.ppl import ppl_on_model
    from spinctl.evaluation.preference import evaluate_pairs

    ppl = ppl_on_model(
        model, tok, probes.ppl, cfg.seqlen, None if probes.ppl.kind == "text" else cfg.batch_size, cfg.max_length
    )
    pairs = {}
    for ps in probes.pair_sets:
        r = evaluate_pairs(model, tok, ps, cfg.batch_size, cfg.max_length, cfg.resamples)
        pairs[ps.name] = {k: r[k] for k in ("accuracy", "ci_low", "ci_high", "margin", "n")}
    judged = {}
    for name, questions in probes.judge:
        answers = generate_texts(model, tok, questions, cfg.max_new_tokens, cfg.batch_size, chat_template=True)
        judged[name] = awareness_rate(KeywordJudge().judge_batch(list(questions), answers))
    return {
        "ppl": ppl["ppl"],
        "pairs": pairs,
        "awareness": float(np.mean([p["accuracy"] for p in pairs.values()])),
        "judged": judged,
    }


# ---------------------------------------------------------------- the sweep


def pick_best(rows: list[dict], budget: float) -> int | None:
    """Index of the best non-baseline row: ppl ≤ baseline·(1+budget), highest awareness; ties -> fewer
    weights zeroed, then grid order. None when no setting fits the budget."""
    limit = rows[0]["ppl"] * (1 + budget)
    fits = [i for i, r in enumerate(rows) if i > 0 and r["ppl"] <= limit]
    if not fits:
        return None
    return min(fits, key=lambda i: (-rows[i]["awareness"], rows[i]["zeroed"], i))


def _row(setting: Setting | None, method: str, zeroed: int, m: dict, base_ppl: float | None, seconds: float) -> dict:
    base_ppl = m["ppl"] if base_ppl is None else base_ppl
    return {
        "setting": "original" if setting is None else setting.label,
        "method": method,
        "mode": setting and setting.mode,
        "p": setting and setting.p,
        "q": setting and setting.q,
        "targets": setting and setting.targets,
        "zeroed": zeroed,
        "ppl": m["ppl"],
        "ppl_change": m["ppl"] / base_ppl - 1,
        "pairs": m["pairs"],
        "awareness": m["awareness"],
        "judged": m["judged"],
        "seconds": round(seconds, 3),
        "best": False,
    }


@dataclass(frozen=True)
class Inputs:
    """The score files and evaluation data of a sweep, read and cross-checked before the model loads."""

    retain: object  # formats.ScoreFile
    couple: tuple  # formats.ScoreFile, ...
    probes: Probes
    method: str  # from the score files' metadata: "snip", or "snip+wanda" when they differ


def check_inputs(cfg: SweepConfig) -> Inputs:
    """Read the score files and data; every grid setting's p/q, the targets and the model checked now."""
    from spinctl.io.checkpoint import open_checkpoint
    from spinctl.io.formats import read_scores
    from spinctl.selection import check_compatible

    retain = read_scores(cfg.retain)
    couple = [read_scores(c) for c in cfg.couple]
    for s in cfg.grid():  # a p or q above what a score file kept fails now, not after the first settings
        check_compatible(retain, couple, s.p, s.q)
    if Path(cfg.model).exists() and open_checkpoint(cfg.model).fingerprint() != retain.meta["fingerprint"]:
        raise InputError(f"{cfg.retain}: scored a different model than {cfg.model} (fingerprints differ)")
    names = list(retain.shapes)
    for spec in cfg.targets:
        if not tensor_filter(names, spec):
            raise InputError(
                f"--targets {spec}: matches none of the {len(names)} tensors in {cfg.retain} "
                f"(scored with --targets {retain.meta.get('targets')})"
            )
    method = "+".join(dict.fromkeys(str(f.meta.get("method", "?")) for f in (retain, *couple)))
    return Inputs(retain, tuple(couple), load_probes(cfg), method)


def sweep_model(model, tok, cfg: SweepConfig, log: Log = lambda s: None, inputs: Inputs | None = None) -> dict:
    """The sweep on an already loaded model, left exactly as it was found; see run_sweep.

    `model, tok` as runtime.load_causal_lm(cfg.model, …) returns them (the tokenizer pads on the
    left, for generation); `inputs` from check_inputs(cfg), read again when not given.
    """
    t0 = time.perf_counter()
    inputs = inputs or check_inputs(cfg)
    retain, couple, probes, method = inputs.retain, list(inputs.couple), inputs.probes, inputs.method
    params = check_targets(model, retain.shapes, cfg.model)
    before = state_digest(model)

    log(
        f"original model: ppl on {probes.ppl.path.name}, {len(probes.pair_sets)} pair sets"
        + (f", {len(probes.judge)} judged prompt sets" if probes.judge else "")
    )
    t = time.perf_counter()
    rows = [_row(None, method, 0, measure(model, tok, probes, cfg), None, time.perf_counter() - t)]
    base = rows[0]["ppl"]
    log(f"    ppl {base:.4f}, awareness {rows[0]['awareness']:.4f}, {rows[0]['seconds']:.1f} s")
    for k, s in enumerate(cfg.grid(), 1):
        t = time.perf_counter()
        selection = selection_for(retain, couple, s)
        with zeroed(params, selection) as n:
            log(f"[{k}/{len(cfg.grid())}] {s.label}: {n} weights zeroed")
            m = measure(model, tok, probes, cfg)
        rows.append(_row(s, method, n, m, base, time.perf_counter() - t))
        log(
            f"    ppl {m['ppl']:.4f} ({rows[-1]['ppl_change']:+.2%}), awareness {m['awareness']:.4f}, "
            f"{rows[-1]['seconds']:.1f} s"
        )
    if state_digest(model) != before:
        raise SpinctlError(
            "the model's weights differ from the original after the sweep; this is a bug, please report it"
        )
    best = pick_best(rows, cfg.max_ppl_increase)
    if best is not None:
        rows[best]["best"] = True
    return {
        "model": str(cfg.model),
        "retain": str(cfg.retain),
        "couple": [str(c) for c in cfg.couple],
        "ppl_data": str(probes.ppl.path),
        "ppl_kind": probes.ppl.kind,
        "ppl_rows": len(probes.ppl.rows),
        "pair_sets": {
            ps.name: {
                "safe": str(ps.safe),
                "unsafe": str(ps.unsafe),
                "n": ps.n,
                "shared": ps.shared,
                "identical": ps.identical,
                "excluded": ps.excluded,
            }
            for ps in probes.pair_sets
        },
        "max_ppl_increase": cfg.max_ppl_increase,
        "ppl_limit": base * (1 + cfg.max_ppl_increase),
        "rows": rows,
        "best": best,
        "best_setting": rows[best]["setting"] if best is not None else "none",
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run_sweep(cfg: SweepConfig, log: Log = lambda s: None) -> dict:
    """Load the model once, sweep the grid, return the table (row 0 the original model) and the best row."""
    from spinctl.runtime import load_causal_lm

    t0 = time.perf_counter()
    inputs = check_inputs(cfg)  # a bad score file or data file fails before the model loads
    model, tok = load_causal_lm(cfg.model, cfg.device, cfg.dtype)
    log(f"loaded {cfg.model} in {time.perf_counter() - t0:.1f} s")
    result = sweep_model(model, tok, cfg, log, inputs)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
