"""spin.yaml: the schema of `spinctl run`, loaded safely, checked key by key, `--set` overrides applied."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

SCHEMA: dict[str, object] = {
    "model": str, "output": str, "cache_dir": str, "retain": str, "couple": list,
    "score": {"method", "nsamples", "seed", "keep", "targets", "max_length", "batch_size", "device", "dtype",
              "chat_template", "prompt_column", "response_column", "stream", "spill_dir"},
    "select": {"p", "q", "mode"},
    "patch": {"in_place", "link", "no_hash"},
    "eval": {"prompts", "column", "judge", "judge_model", "judge_template", "limit", "max_new_tokens", "batch_size"},
}
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


def _check_keys(path: Path, where: str, given: dict, valid) -> None:
    for key in given:
        if key not in valid:
            raise InputError(f"{path}: unknown key {where}{key!r}; valid keys: {', '.join(sorted(valid))}")


def _set(data: dict, assignment: str, path: Path) -> None:
    """`score.nsamples=64` → data["score"]["nsamples"] = 64 (the value parsed as YAML)."""
    import yaml

    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise InputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. score.nsamples=64")
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {assignment!r}: {p} is not a section")
    node[leaf] = yaml.safe_load(value)


def _rel(base: Path, value: str) -> str:
    """Relative paths are relative to the YAML file; builtin:NAME stays as it is."""
    if value.startswith("builtin:"):
        return value
    return str(base / os.path.expanduser(value))


def load_run_config(path: Path, overrides: list[str] = ()) -> RunConfig:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys")
    for assignment in overrides:
        _set(data, assignment, path)
    _check_keys(path, "", data, SCHEMA)
    for section, valid in SCHEMA.items():
        if isinstance(valid, set) and section in data:
            if not isinstance(data[section], dict):
                raise InputError(f"{path}: {section} must be a mapping")
            _check_keys(path, f"{section}.", data[section], valid)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise InputError(f"{path}: missing required key {missing[0]!r}")
    couple = data["couple"]
    if not isinstance(couple, list) or not couple or not all(isinstance(c, str) for c in couple):
        raise InputError(f"{path}: couple must be a non-empty list of data files")
    patch = dict(data.get("patch") or {})
    if not patch.get("in_place") and not data.get("output"):
        raise InputError(f"{path}: give output (a new directory), or patch.in_place: true")
    base = path.resolve().parent
    cache = data.get("cache_dir") or os.environ.get("SPINCTL_CACHE") or "~/.cache/spinctl"
    score = dict(data.get("score") or {})
    if score.get("spill_dir"):
        score["spill_dir"] = Path(_rel(base, str(score["spill_dir"])))
    ev = data.get("eval")
    if ev is not None:
        ev = dict(ev)
        prompts = ev.get("prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise InputError(f"{path}: eval.prompts must be a list of prompt files")
        ev["prompts"] = [_rel(base, p) for p in prompts]
        for k in ("judge_model", "judge_template"):
            if ev.get(k):
                ev[k] = _rel(base, ev[k])
    return RunConfig(
        model=Path(_rel(base, str(data["model"]))),
        output=Path(_rel(base, str(data["output"]))) if data.get("output") and not patch.get("in_place") else None,
        cache_dir=Path(_rel(base, str(cache))), retain=_rel(base, str(data["retain"])),
        couple=tuple(_rel(base, c) for c in couple), score=score,
        select=dict(data.get("select") or {}), patch=patch, eval=ev,
    )
