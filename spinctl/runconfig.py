"""spin.yaml: the schema of `spinctl run`, loaded safely, checked key by key, `--set` overrides applied."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spinctl.config import (
    EvalConfig,
    OptionError,
    PatchConfig,
    ReportConfig,
    ScoreConfig,
    SelectConfig,
    check_text,
    options,
    short,
)
from spinctl.errors import InputError
from spinctl.io import untrusted

# A spin.yaml holds tens of values. YAML aliases share nodes, so a few hundred bytes of nested
# aliases can stand for billions of values (the "billion laughs"), which anything that walks
# the data (str(), json.dumps for the cache key) then expands: refuse such a document at load.
MAX_NODES = 100_000


@dataclass(frozen=True)
class RunConfig:
    """A loaded spin.yaml. The sections are the stages' own configs; their inputs (data and score
    files) are filled in by `spinctl run` as it goes."""

    model: Path
    output: Path | None  # None: patch in place
    cache_dir: Path
    retain: str  # path or builtin:NAME
    couple: tuple[str, ...]
    score: ScoreConfig
    select: SelectConfig
    patch: PatchConfig
    eval: EvalConfig | None = None
    eval_prompts: tuple[str, ...] = ()
    report: ReportConfig | None = None  # its output is the report directory; the rest is filled in by run
    text: str = ""  # spin.yaml as written, and the --set overrides: quoted in the report
    overrides: tuple[str, ...] = ()


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

    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here, at once
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
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


# ---- checking: the schema is config.py's options ----------------------------------------------


def _texts(v):
    if isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v):
        return v
    raise ValueError("must be a non-empty list of file names (strings)")


def _text_or_texts(v):
    return [check_text(v)] if isinstance(v, str) else _texts(v)


TOP = {"model": check_text, "output": check_text, "cache_dir": check_text, "retain": check_text, "couple": _texts}
SECTIONS = {
    "score": ScoreConfig,
    "select": SelectConfig,
    "patch": PatchConfig,
    "eval": EvalConfig,
    "report": ReportConfig,
}
# section keys that are inputs of the run, not options
INPUTS = {"eval": {"prompts": _text_or_texts}, "report": {"dir": check_text}}
REQUIRED = ("model", "retain", "couple")


def section_checks(section: str) -> dict[str, Callable]:
    """The keys of a spin.yaml section and their checks: every option config.py marks for YAML."""
    checks = {f.name: f.metadata["opt"].check for f in options(SECTIONS[section]) if f.metadata["opt"].yaml}
    return {**checks, **INPUTS.get(section, {})}


def _check_keys(path: Path, where: str, given: dict, valid) -> None:
    for key in given:
        if key not in valid:
            raise InputError(f"{path}: unknown key {where}{key!r}; valid keys: {', '.join(sorted(map(str, valid)))}")


def _check_values(path: Path, data: dict) -> None:
    """Every value against its option's check, in place (normalised), naming the key: before any work starts."""
    _check_keys(path, "", data, [*TOP, *SECTIONS])
    items = [(key, data, key, check) for key, check in TOP.items() if key in data]
    for section in SECTIONS:
        if section not in data:
            continue
        if data[section] is None:  # `score:` with nothing under it
            data[section] = {}
        if not isinstance(data[section], dict):
            raise InputError(f"{path}: {section} must be a mapping of keys, got {short(data[section])}")
        checks = section_checks(section)
        _check_keys(path, f"{section}.", data[section], checks)
        items += [(f"{section}.{k}", data[section], k, checks[k]) for k in data[section]]
    for name, parent, k, fn in items:
        try:
            parent[k] = fn(parent[k])
        except ValueError as e:
            raise InputError(f"{path}: {name} {e}, got {short(parent[k])}") from None
    ev = data.get("eval")
    if ev is not None and "prompts" not in ev:
        raise InputError(f"{path}: eval.prompts is missing: give the prompt files to evaluate on")


def _typed(path: Path, section: str, build: Callable):
    """Build a section's config; a check across its options is re-worded with the YAML keys."""
    try:
        return build()
    except OptionError as e:
        raise InputError(f"{path}: {e.render(lambda name: f'{section}.{name}')}") from None


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
    untrusted.require_regular(path)
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
    for section in SECTIONS:  # paths in spin.yaml are relative to it
        values = data.get(section) or {}
        for f in options(SECTIONS[section]):
            if f.metadata["opt"].relative and values.get(f.name) is not None:
                values[f.name] = Path(_rel(base, str(values[f.name])))
    model = _model(base, data["model"])
    retain, couple = _rel(base, data["retain"]), tuple(_rel(base, c) for c in data["couple"])
    cache = data.get("cache_dir") or os.environ.get("SPINCTL_CACHE") or "~/.cache/spinctl"
    output = Path(_rel(base, data["output"])) if data.get("output") and not patch.get("in_place") else None
    score = _typed(path, "score", lambda: ScoreConfig(model=model, data="", output=Path(), **(data.get("score") or {})))
    ev, prompts = data.get("eval"), ()
    if ev is not None:
        ev = dict(ev)
        prompts = tuple(_rel(base, p) for p in ev.pop("prompts"))
        ev.setdefault("device", score.device)  # evaluate where scoring ran unless told otherwise
        ev = _typed(path, "eval", lambda: EvalConfig(model=model, prompts=Path(prompts[0]), **ev))
    report = dict(data.get("report") or {})
    target = output if output is not None else model
    report_dir = Path(_rel(base, report.pop("dir"))) if "dir" in report else target.with_name(target.name + ".report")
    report = _typed(path, "report", lambda: ReportConfig(report_dir, target, Path(), Path(), (), **report))
    if report.card and target.is_file():
        raise InputError(f"{path}: report.card needs a model directory; {target} is a lone weight file (no README.md)")
    return RunConfig(
        model=model,
        output=output,
        cache_dir=Path(_rel(base, str(cache))),
        retain=retain,
        couple=couple,
        score=score,
        select=_typed(
            path, "select", lambda: SelectConfig(Path(retain), tuple(map(Path, couple)), **(data.get("select") or {}))
        ),
        patch=_typed(path, "patch", lambda: PatchConfig(model, output, **patch)),
        eval=ev,
        eval_prompts=prompts,
        report=report,
        text=text,
        overrides=tuple(overrides),
    )
