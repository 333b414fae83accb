"""spin.yaml: the schema of `spinctl run`, loaded safely, checked key by key, `--set` overrides applied."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from spinctl.errors import InputError

# A spin.yaml holds tens of values. YAML aliases share nodes, so a few hundred bytes of nested
# aliases can stand for billions of values (the "billion laughs"), which anything that walks
# the data (str(), json.dumps for the cache key) then expands: refuse such a document at load.
MAX_NODES = 100_000


# ---- value checks: each returns the normalised value or raises ValueError(what is expected) ----

def _text(v):
    if isinstance(v, str) and v.strip():
        return v
    raise ValueError("must be a non-empty string")


def _texts(v):
    if isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v):
        return v
    raise ValueError("must be a non-empty list of file names (strings)")


def _text_or_texts(v):
    return [_text(v)] if isinstance(v, str) else _texts(v)


def _flag(v):
    if isinstance(v, bool):  # not 'false': a non-empty string is truthy, and in_place: 'false' patched in place
        return v
    raise ValueError("must be true or false (unquoted)")


def _integer(low: int, none_ok: bool = False) -> Callable:
    def check(v):
        if none_ok and v is None:
            return None
        if isinstance(v, int) and not isinstance(v, bool) and v >= low:
            return v
        raise ValueError(f"must be an integer >= {low}" + (" (or null)" if none_ok else ""))
    return check


def _number(low: float, high: float, low_open: bool = False) -> Callable:
    def check(v):
        # PyYAML (YAML 1.1) reads 5e-7, without a dot, as a string: accept any finite decimal.
        x = v
        if isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                x = None
        if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
                and (low < x if low_open else low <= x) and x <= high:
            return float(x)
        raise ValueError(f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}]")
    return check


def _choice(*values: str) -> Callable:
    def check(v):
        if isinstance(v, str) and v in values:
            return v
        raise ValueError(f"must be one of {', '.join(values)}")
    return check


def _batch(v):
    return None if v in (None, "auto") else _integer(1)(v)  # `auto` (or null): the planner picks


def _device(v):
    from spinctl.runtime import FORMS, check_device

    try:
        return check_device(v)
    except InputError:
        raise ValueError(f"must be {FORMS}") from None


def _targets(v):
    from spinctl.scoring.targets import check_spec

    if not isinstance(v, str):
        raise ValueError("must be mlp, attn, all or re:REGEX")
    try:
        check_spec(v)
    except InputError as e:
        raise ValueError(str(e).removeprefix(f"--targets {v!r}: ")) from None
    return v


def _schema() -> dict[str, Any]:
    """key -> check, or section -> {key -> check}. Built on use: the enums live in their stages' modules."""
    from spinctl.evaluation.judges import JudgeName
    from spinctl.scoring.methods import Method
    from spinctl.scoring.engine import DTYPES
    from spinctl.selection import Mode

    return {
        "model": _text, "output": _text, "cache_dir": _text, "retain": _text, "couple": _texts,
        "score": {
            "method": _choice(*(m.value for m in Method)), "nsamples": _integer(1), "seed": _integer(0),
            "keep": _number(0, 1, low_open=True), "targets": _targets, "max_length": _integer(2),
            "batch_size": _batch, "device": _device, "dtype": _choice(*DTYPES), "chat_template": _flag,
            "prompt_column": _text, "response_column": _text, "stream": _flag, "spill_dir": _text,
        },
        "select": {"p": _number(0, 1), "q": _number(0, 1), "mode": _choice(*(m.value for m in Mode))},
        "patch": {"in_place": _flag, "link": _flag, "no_hash": _flag},
        "eval": {
            "prompts": _text_or_texts, "column": _text, "judge": _choice(*(j.value for j in JudgeName)),
            "judge_model": _text, "judge_template": _text, "limit": _integer(1, none_ok=True),
            "max_new_tokens": _integer(1), "batch_size": _integer(1),
        },
    }


SECTIONS = ("score", "select", "patch", "eval")
REQUIRED = ("model", "retain", "couple")


@dataclass(frozen=True)
class RunConfig:
    model: Path
    output: Path | None  # None: patch in place
    cache_dir: Path
    retain: str  # path or builtin:NAME
    couple: tuple[str, ...]
    score: dict = field(default_factory=dict)
    select: dict = field(default_factory=dict)
    patch: dict = field(default_factory=dict)
    eval: dict | None = None


# ---- loading: safe, bounded ---------------------------------------------------------------

def _expanded_size(node, sizes: dict[int, int], active: set[int]) -> int:
    """Nodes in the document once every alias is expanded (shared nodes counted per use); a cycle is infinite."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        return MAX_NODES + 1  # a recursive alias (&a [*a]) expands forever
    children = node.value if isinstance(node.value, list) else []
    active.add(key)
    total = 1
    for child in children:
        for c in child if isinstance(child, tuple) else (child,):  # mapping values are (key, value) pairs
            total += _expanded_size(c, sizes, active)
            if total > MAX_NODES:
                break
    active.discard(key)
    sizes[key] = total
    return total


def parse_yaml(text: str, where: str):
    """yaml.safe_load, refusing alias expansion past MAX_NODES and nesting past Python's stack, as InputError."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_NODES:
            raise InputError(f"{where}: YAML aliases expand to more than {MAX_NODES} values; write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(f"{where}: not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()


# ---- checking -----------------------------------------------------------------------------

def _check_keys(path: Path, where: str, given: dict, valid) -> None:
    for key in given:
        if key not in valid:
            raise InputError(f"{path}: unknown key {where}{key!r}; valid keys: {', '.join(sorted(map(str, valid)))}")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_values(path: Path, data: dict) -> None:
    """Every value against the schema, in place (normalised), naming the key: before any work starts."""
    schema = _schema()
    _check_keys(path, "", data, schema)
    for key, check in schema.items():
        if key not in data:
            continue
        if isinstance(check, dict):
            if data[key] is None:  # `score:` with nothing under it
                data[key] = {}
            if not isinstance(data[key], dict):
                raise InputError(f"{path}: {key} must be a mapping of keys, got {_short(data[key])}")
            _check_keys(path, f"{key}.", data[key], check)
            items = [(f"{key}.{k}", data[key], k, check[k]) for k in data[key]]
        else:
            items = [(key, data, key, check)]
        for name, parent, k, fn in items:
            try:
                parent[k] = fn(parent[k])
            except ValueError as e:
                raise InputError(f"{path}: {name} {e}, got {_short(parent[k])}") from None
    score = data.get("score") or {}
    if score.get("spill_dir") and not score.get("stream"):
        raise InputError(f"{path}: score.spill_dir applies to score.stream: true only")
    ev = data.get("eval")
    if ev is not None:
        if "prompts" not in ev:
            raise InputError(f"{path}: eval.prompts is missing: give the prompt files to evaluate on")
        if ev.get("judge") == "model" and not (ev.get("judge_model") and ev.get("judge_template")):
            raise InputError(f"{path}: eval.judge model needs eval.judge_model and eval.judge_template")


def _set(data: dict, assignment: str, path: Path) -> None:
    """`score.nsamples=64` → data["score"]["nsamples"] = 64 (the value parsed as YAML)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise InputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. score.nsamples=64")
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {assignment!r}: {p} is not a section")
    node[leaf] = parse_yaml(value, f"--set {assignment!r}")


def _rel(base: Path, value: str) -> str:
    """Relative paths are relative to the YAML file; builtin:NAME stays as it is."""
    if value.startswith("builtin:"):
        return value
    return str(base / os.path.expanduser(value))


def _model(base: Path, value: str) -> Path:
    """model: a path relative to the YAML file, else a Hub id org/name[@rev] from the local HF cache."""
    from spinctl.sources.hub import HUB_ID, resolve_model

    local = Path(_rel(base, value))
    return local if local.exists() or not HUB_ID.fullmatch(value) else resolve_model(value)


def load_run_config(path: Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys")
    for assignment in overrides:
        _set(data, assignment, path)
    _check_values(path, data)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise InputError(f"{path}: missing required key {missing[0]!r}")
    patch = dict(data.get("patch") or {})
    if not patch.get("in_place") and not data.get("output"):
        raise InputError(f"{path}: give output (a new directory), or patch.in_place: true")
    base = path.resolve().parent
    cache = data.get("cache_dir") or os.environ.get("SPINCTL_CACHE") or "~/.cache/spinctl"
    score = dict(data.get("score") or {})
    if score.get("spill_dir"):
        score["spill_dir"] = Path(_rel(base, score["spill_dir"]))
    ev = data.get("eval")
    if ev is not None:
        ev = dict(ev)
        ev["prompts"] = [_rel(base, p) for p in ev["prompts"]]
        for k in ("judge_model", "judge_template"):
            if ev.get(k):
                ev[k] = _rel(base, ev[k])
    return RunConfig(
        model=_model(base, data["model"]),
        output=Path(_rel(base, data["output"])) if data.get("output") and not patch.get("in_place") else None,
        cache_dir=Path(_rel(base, str(cache))), retain=_rel(base, data["retain"]),
        couple=tuple(_rel(base, c) for c in data["couple"]), score=score,
        select=dict(data.get("select") or {}), patch=patch, eval=ev,
    )
