"""`spinctl run spin.yaml`: score every dataset (cached), select, patch, verify, optionally evaluate."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from spinctl.config import values
from spinctl.errors import OutputError
from spinctl.io.checkpoint import open_checkpoint
from spinctl.io.files import check_creatable, check_output_file
from spinctl.io.formats import FORMAT, read_selection, write_selection
from spinctl.runconfig import RunConfig
from spinctl.scoring import distributed
from spinctl.scoring.data import label as data_label

Log = Callable[[str], None]


def cache_key(ck, dataset_sha256: str, options: dict) -> str:
    """Fingerprint, size and mtime of every weight file, the data's sha256, every scoring option, the format."""
    files = [[s.path.name, s.size, s.path.stat().st_mtime_ns] for s in ck.shards]
    text = json.dumps(
        {"fingerprint": ck.fingerprint(), "files": files, "data": dataset_sha256, "options": options, "format": FORMAT},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _score_options(cfg: RunConfig) -> dict:
    # From the typed section, so a default written out and one left implicit share a key.
    # stream and spill_dir change where memory goes, not the scores: they stay out of the key.
    return {k: v for k, v in values(cfg.score).items() if k not in ("stream", "spill_dir")}


def score_all(cfg: RunConfig, log: Log) -> list[dict]:
    """One score file per dataset, from the cache when the same inputs were scored before."""
    from spinctl.runtime import load_model
    from spinctl.scoring.data import read_rows
    from spinctl.scoring.engine import score

    ck = open_checkpoint(cfg.model)
    options = _score_options(cfg)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    loaded, out = None, []
    for data in (cfg.retain, *cfg.couple):
        rows = read_rows(data, options["prompt_column"], options["response_column"])
        file = cfg.cache_dir / f"scores-{cache_key(ck, rows.sha256, options)}.safetensors"
        # Rank 0's cache decides for all: only rank 0 reads score files, and ranks must score together.
        if distributed.exchange(distributed.context(), cached=file.is_file())[0]["cached"]:
            log(f"scores for {data}: cached ({file.name})")
            out.append({"data": data, "file": str(file), "cached": True})
            continue
        sc = replace(cfg.score, data=data, output=file)
        if not sc.stream:  # one load for all datasets; --stream reads one layer at a time instead
            loaded = loaded or load_model(sc.model, sc.device, sc.dtype, sc.trust_remote_code)
        log(f"scoring {data} ({sc.method.value}, {sc.nsamples} samples)")
        summary = score(sc, loaded=loaded)
        out.append({"data": data, "file": str(file), "cached": False, "seconds": summary["seconds"]})
    return out


def run(cfg: RunConfig, log: Log = lambda s: None) -> dict:
    from spinctl.patch import check_output_dir, patch
    from spinctl.report.write import check_report_dir
    from spinctl.selection import run_select
    from spinctl.verify import verify

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    with distributed.session() as ctx:  # under torchrun every rank scores a share; rank 0 alone goes on
        open_checkpoint(cfg.model)  # a missing model is named as such, not as an output inside its parent
        if cfg.output is not None and ctx.is_main:
            check_output_dir(cfg.output, cfg.model)  # fail before minutes of scoring, not after
        if cfg.report is not None and ctx.is_main:
            check_report_dir(cfg.report.output)
            check_report_place(cfg)
        if cfg.eval is not None and ctx.is_main:
            check_eval(cfg)  # a bad prompts file must not fail the run after patching (in place, even)
        scores = score_all(cfg, log if ctx.is_main else lambda s: None)
    seconds["score"] = time.perf_counter() - t
    if not ctx.is_main:
        return {"rank": ctx.rank, "scores": scores}

    t = time.perf_counter()
    selected, meta = run_select(
        replace(cfg.select, retain=Path(scores[0]["file"]), couple=tuple(Path(s["file"]) for s in scores[1:]))
    )
    sel_file = (
        cfg.cache_dir
        / f"selection-{hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]}.safetensors"
    )
    write_selection(sel_file, selected, meta)
    seconds["select"] = time.perf_counter() - t
    log(
        f"selected {sum(len(a) for a in selected.values())} weights (mode {meta['mode']}, p {meta['p']}, q {meta['q']})"
    )

    t = time.perf_counter()
    manifest = patch(cfg.patch, read_selection(sel_file))
    seconds["patch"] = time.perf_counter() - t
    target = Path(manifest["output"])

    t = time.perf_counter()
    check = verify(target)
    seconds["verify"] = time.perf_counter() - t
    if not check["ok"]:
        bad = check["hash_mismatches"] + check["nonzero_tensors"]
        raise OutputError(
            f"{target}: verification failed after patching ({', '.join(bad[:3])}); run spinctl verify {target}"
        )
    log(f"patched and verified: {target}")

    result = {
        "scores": scores,
        "selection": str(sel_file),
        "selected": manifest["totals"]["zeroed"],
        "output": str(target),
        "verified": check["ok"],
        "per_tensor": manifest["tensors"],
    }
    if cfg.eval:
        t = time.perf_counter()
        result["eval"] = evaluate_both(cfg, target if target.is_dir() else target.parent, log)
        seconds["eval"] = time.perf_counter() - t
    else:
        result["eval"] = None
    if cfg.report is not None:
        t = time.perf_counter()
        result["report"] = report(cfg, result, target)
        seconds["report"] = time.perf_counter() - t
        log(f"report: {result['report']['output']}" + (" (and README.md)" if result["report"]["card"] else ""))
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return result


def report(cfg: RunConfig, result: dict, target: Path) -> dict:
    """The report of this run beside its output: its selection, score files, evals and spin.yaml."""
    from spinctl.report.write import write_report

    scores = [Path(s["file"]) for s in result["scores"]]
    rcfg = replace(
        cfg.report, patched=target, selection=Path(result["selection"]), retain=scores[0], couple=tuple(scores[1:])
    )
    labels = [data_label(d) for d in (cfg.retain, *cfg.couple)]
    recipe = {"kind": "spin.yaml", "text": cfg.text, "overrides": list(cfg.overrides)}
    out = write_report(rcfg, [("spinctl run", {"scores": result["scores"], "eval": result["eval"]})], recipe, labels)
    return {k: v for k, v in out.items() if k != "summary"}


def check_report_place(cfg: RunConfig) -> None:
    """report.dir, before any work: outside the model and the output (both are written or
    copied whole), and under a directory, not a file."""
    out = cfg.report.output.resolve()
    for d in (cfg.model, cfg.output):
        if d is not None and (out == d.resolve() or d.resolve() in out.parents):
            raise OutputError(f"{cfg.report.output}: report.dir must be outside the model and output directories")
    check_creatable(cfg.report.output, "report.dir")


def _models(cfg: RunConfig, patched: Path) -> dict[str, Path]:
    """The models evaluated: the original too, unless it was patched in place."""
    return {"patched": patched} if cfg.output is None else {"original": cfg.model, "patched": patched}


def save_path(cfg: RunConfig, k: int, label: str) -> Path | None:
    """Where the answers of one model on prompt set k go: eval.save as NAME.LABEL.jsonl, with
    several prompt sets NAME.K.LABEL.jsonl (K from 1), so that no evaluation overwrites another's."""
    save = cfg.eval.save
    if save is None:
        return None
    tag = f"{k + 1}.{label}" if len(cfg.eval_prompts) > 1 else label
    return save.with_name(f"{save.stem}.{tag}{save.suffix}")


def prompts_path(p: str) -> Path:
    """An eval prompts file: builtin:NAME resolved, a path as given (load_questions names it if missing)."""
    from spinctl.scoring.data import BUILTIN_PREFIX, resolve

    return resolve(p) if p.startswith(BUILTIN_PREFIX) else Path(p)


def check_eval(cfg: RunConfig) -> None:
    """The eval stage's inputs and outputs, before scoring: every prompts file and the judge
    read, and no answers file over an input of the run or inside the model."""
    from spinctl.evaluation.evaluate import load_questions, make_judge
    from spinctl.scoring.data import resolve

    prompts = [prompts_path(p) for p in cfg.eval_prompts]
    for p in prompts:
        load_questions(p, cfg.eval.column, cfg.eval.limit)
    make_judge(cfg.eval)  # reads a model judge's template; its model loads only when it judges
    inputs = [*prompts, *(resolve(d) for d in (cfg.retain, *cfg.couple))]
    for k in range(len(prompts)):
        for label in _models(cfg, cfg.model):
            check_output_file(save_path(cfg, k, label), inputs, [cfg.model], "eval.save")


def evaluate_both(cfg: RunConfig, patched: Path, log: Log) -> list[dict]:
    """Awareness of the original and the patched model on each prompt set (original skipped when patched in place)."""
    from spinctl.evaluation.evaluate import evaluate

    out = []
    for k, p in enumerate(cfg.eval_prompts):
        row = {"prompts": p}
        for label, model in _models(cfg, patched).items():
            log(f"evaluating the {label} model on {p}")
            row[label] = evaluate(
                replace(cfg.eval, model=model, prompts=prompts_path(p), save=save_path(cfg, k, label))
            )
        out.append(row)
    return out
