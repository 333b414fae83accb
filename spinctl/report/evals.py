"""Eval results (the JSON of `spinctl eval`, `ppl` and `run`) as before/after measurements of the patched model."""

from __future__ import annotations

from pathlib import Path

from spinctl.errors import InputError
from spinctl.io import untrusted
from spinctl.scoring.data import label as data_label

METRICS = ("perplexity", "awareness", "preference accuracy")  # the order of tables and bars


def read_eval_file(path: Path) -> dict:
    data = untrusted.read_json(path, "no such eval result file")
    if not isinstance(data, dict):
        raise InputError(f"{path}: not an eval result (a JSON object of spinctl eval, ppl or run --json)")
    return data


def _flatten(data, where: str) -> list[dict]:
    """Every measurement in one JSON object: {metric, set, model, value, n}."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: not an eval result (a JSON object of spinctl eval, ppl or run --json)")
    if "scores" in data and "eval" in data:  # spinctl run --json
        rows = data["eval"] or []
        if not isinstance(rows, list):
            raise InputError(f"{where}: eval of a run result is not a list")
        out = []
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("prompts"), str):
                raise InputError(f"{where}: an eval row of a run result lacks its prompts")
            for label in ("original", "patched"):
                if label in row:
                    out += [m | {"set": data_label(row["prompts"])} for m in _flatten(row[label], where)]
        return out
    if "original" in data and "compare" in data:  # spinctl eval --compare
        return _flatten(data["original"], where) + _flatten(data["compare"], where)
    if "awareness" in data and "preference" in data:  # --prompts and --pairs together
        return _flatten(data["awareness"], where) + _flatten(data["preference"], where)
    model = data.get("model")
    if not isinstance(model, str):
        raise InputError(f"{where}: not an eval result (a JSON object of spinctl eval, ppl or run --json)")
    try:
        if "rate" in data:
            if data["rate"] is None:  # every answer unjudgeable: no rate to show
                return []
            prompts = data.get("prompts")  # older results lack it: an unnamed set
            return [
                _m("awareness", data_label(prompts) if isinstance(prompts, str) else "", model, data["rate"], data["n"])
            ]
        if "pair_sets" in data:
            return [_m("preference accuracy", s["name"], model, s["accuracy"], s["n"]) for s in data["pair_sets"]]
        if "ppl" in data:
            return [_m("perplexity", Path(data["file"]).name, model, data["ppl"], data.get("rows") or data["tokens"])]
    except (KeyError, TypeError) as e:
        raise InputError(f"{where}: eval result lacks {e}") from None
    raise InputError(f"{where}: not an eval result (a JSON object of spinctl eval, ppl or run --json)")


def _m(metric: str, name: str, model: str, value, n) -> dict:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(n, int):
        raise TypeError("a number")
    return {"metric": metric, "set": name, "model": model, "value": float(value), "n": n}


def before_after(results: list[tuple[str, dict]], patched: Path) -> list[dict]:
    """One row per (metric, set): `before` (any other model) and `after` (the patched one), None where absent.

    `results` are (where, JSON object) pairs; a model is the patched one when its path resolves
    to `patched` (or the directory holding a patched lone file).
    """
    patched = Path(patched).resolve()
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
    model = Path(m["model"]).resolve()
    return model == patched or (patched.is_file() and model == patched.parent)
