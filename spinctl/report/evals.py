"""Eval results (the JSON of `spinctl eval`, `ppl` and `run`) as before/after measurements of the patched model.

An eval file is checked whole when it is read (`read_eval_file`), before the report writes
anything: every name a string, every rate and accuracy a finite number in [0, 1], every
perplexity finite and positive, every count a non-negative integer, the model a path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from spinctl.errors import InputError
from spinctl.io import untrusted
from spinctl.scoring.data import label as data_label

METRICS = ("perplexity", "awareness", "preference accuracy")  # the order of tables and bars
NOT_EVAL = "not an eval result (a JSON object of spinctl eval, ppl or run --json)"


def read_eval_file(path: Path) -> dict:
    """The eval result in PATH, every measurement in it checked (InputError `PATH: reason`)."""
    data = untrusted.read_json(path, "no such eval result file")  # a FIFO refused, not read
    if not isinstance(data, dict):
        raise InputError(f"{path}: {NOT_EVAL}")
    try:
        _flatten(data, str(path))
    except RecursionError:  # `original`/`compare` nested about as deep as the JSON parser allows
        raise InputError(f"{path}: {NOT_EVAL}: nested too deeply") from None
    return data


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(where: str, key: str, why: str, v) -> InputError:
    return InputError(f"{where}: {key} {why}, got {_short(v)}")


def _text(v, where: str, key: str) -> str:
    """A non-empty string without NUL (a path or a name)."""
    if not isinstance(v, str) or not v or "\0" in v:
        raise _bad(where, key, "must be a non-empty string without NUL", v)
    return v


def _number(v, where: str, key: str, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    try:
        x = float(v) if ok else math.nan
    except OverflowError:  # an integer of 400 digits
        x = math.nan
    if not (math.isfinite(x) and (low < x if low_open else low <= x) and x <= high):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise _bad(where, key, f"must be a finite number in {span}", v)
    return x


def _count(v, where: str, key: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(where, key, "must be a non-negative integer", v)
    return v


def _set_label(prompts: str) -> str:
    try:
        return data_label(prompts)
    except (OSError, RuntimeError):  # a symlink loop on the way: its name still names the set
        return Path(prompts).name


def _flatten(data, where: str, key: str = "") -> list[dict]:
    """Every measurement in one JSON object: {metric, set, model, value, n}; InputError on anything malformed.

    `key` is where `data` sits in the file (`compare.`, `eval[0].patched.`), for the messages."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: {key.rstrip('.') + ' is ' if key else ''}{NOT_EVAL}")
    if "scores" in data and "eval" in data:  # spinctl run --json
        rows = data["eval"]
        if rows is None:  # a run without evals
            return []
        if not isinstance(rows, list):
            raise _bad(where, f"{key}eval", "of a run result must be a list", rows)
        out = []
        for i, row in enumerate(rows):
            at = f"{key}eval[{i}]"
            if not isinstance(row, dict):
                raise _bad(where, at, "of a run result must be an object", row)
            name = _set_label(_text(row.get("prompts"), where, f"{at}.prompts"))
            for label in ("original", "patched"):
                if label in row:
                    out += [m | {"set": name} for m in _flatten(row[label], where, f"{at}.{label}.")]
        return out
    if "original" in data and "compare" in data:  # spinctl eval --compare
        return _flatten(data["original"], where, f"{key}original.") + _flatten(data["compare"], where, f"{key}compare.")
    if "awareness" in data and "preference" in data:  # --prompts and --pairs together
        return _flatten(data["awareness"], where, f"{key}awareness.") + _flatten(
            data["preference"], where, f"{key}preference."
        )
    if not any(k in data for k in ("rate", "pair_sets", "ppl")) or "model" not in data:
        raise InputError(f"{where}: {key.rstrip('.') + ' is ' if key else ''}{NOT_EVAL}")
    model = _text(data["model"], where, f"{key}model")
    if "rate" in data:
        if data["rate"] is None:  # every answer unjudgeable: no rate to show
            return []
        rate = _number(data["rate"], where, f"{key}rate", 0, 1)
        n = _count(data.get("n"), where, f"{key}n")
        prompts = data.get("prompts")  # older results lack it: an unnamed set
        name = "" if prompts is None else _set_label(_text(prompts, where, f"{key}prompts"))
        return [_m("awareness", name, model, rate, n)]
    if "pair_sets" in data:
        sets = data["pair_sets"]
        if not isinstance(sets, list):
            raise _bad(where, f"{key}pair_sets", "must be a list of pair-set results", sets)
        out = []
        for i, s in enumerate(sets):
            at = f"{key}pair_sets[{i}]"
            if not isinstance(s, dict):
                raise _bad(where, at, "must be an object (name, accuracy, n)", s)
            name = _text(s.get("name"), where, f"{at}.name")
            acc = _number(s.get("accuracy"), where, f"{at}.accuracy", 0, 1)
            out.append(_m("preference accuracy", name, model, acc, _count(s.get("n"), where, f"{at}.n")))
        return out
    ppl = _number(data["ppl"], where, f"{key}ppl", 0, math.inf, low_open=True)
    name = Path(_text(data.get("file"), where, f"{key}file")).name
    rows = data.get("rows")  # absent for a plain text file: its tokens are the count
    n = _count(rows, where, f"{key}rows") if rows is not None else 0
    if not n:
        n = _count(data.get("tokens"), where, f"{key}tokens")
    return [_m("perplexity", name, model, ppl, n)]


def _m(metric: str, name: str, model: str, value: float, n: int) -> dict:
    return {"metric": metric, "set": name, "model": model, "value": value, "n": n}


def before_after(results: list[tuple[str, dict]], patched: Path) -> list[dict]:
    """One row per (metric, set): `before` (any other model) and `after` (the patched one), None where absent.

    `results` are (where, JSON object) pairs; a model is the patched one when its path resolves
    to `patched` (or the directory holding a patched lone file).
    """
    patched = Path(os.path.realpath(patched))
    rows: dict[tuple[str, str], dict] = {}
    for where, data in results:
        for m in _flatten(data, where):
            side = "after" if _is(m, patched) else "before"
            row = rows.setdefault((m["metric"], m["set"]), {"metric": m["metric"], "set": m["set"]})
            if side in row:
                name = m["metric"] + (f" on {m['set']}" if m["set"] else "")
                raise InputError(f"{where}: a second {name} result for the {side} model; give each result once")
            row[side] = m["value"]
            row[f"{side}_n"] = m["n"]
    out = [{"before": None, "after": None} | r for r in rows.values()]
    return sorted(out, key=lambda r: (METRICS.index(r["metric"]), r["set"]))


def _is(m: dict, patched: Path) -> bool:
    model = Path(os.path.realpath(m["model"]))  # realpath never raises on a symlink loop, Path.resolve may
    return model == patched or (patched.is_file() and model == patched.parent)
