"""The spinctl command line: parses, calls the library, prints. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import distributed
from .errors import SpinctlError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="SPIN checkpoint surgery: score weights on calibration data, select the ones coupling "
         "fairness and privacy, zero them in a safetensors checkpoint, verify and revert.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
RetainOpt = Annotated[Optional[Path], typer.Option("--retain", help="Score file of the general-capability (retain) set.")]
CoupleOpt = Annotated[Optional[list[Path]], typer.Option("--couple", help="Score file of a behaviour to decouple; repeat (reference mode: privacy, then fairness).")]
POpt = Annotated[float, typer.Option("--p", help="Fraction of each tensor in the retain top set.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another spinctl holds the model, wait for it instead of failing.")]
QOpt = Annotated[float, typer.Option("--q", help="Fraction of each tensor in each coupled top set.")]


def _mode_opt():
    from .select import Mode

    return Annotated[Mode, typer.Option("--mode", help="paper: (∩ top_q(C)) \\ top_p(R); reference: the official code's positional AND.")]


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
    from .progress import reporter

    return reporter(enabled=not (json_out or quiet), unit=unit)


@app.command()
def select(
    output: Annotated[Path, typer.Option("--output", "-o", help="Selection file to write (.safetensors).")],
    retain: RetainOpt = None,
    couple: CoupleOpt = None,
    p: POpt = 5e-7,
    q: QOpt = 5e-7,
    mode: _mode_opt() = "paper",
    json_out: JsonOpt = False,
):
    """Select the weights to zero from score files; write a selection file."""
    from .select import select_to_file

    result = select_to_file(_select_config(retain, couple, p, q, mode), output)
    emit(result, json_out, lambda r: _console().print(
        f"selected [bold]{r['selected']}[/] weights in {r['tensors_touched']}/{r['tensors']} tensors "
        f"(mode {r['mode']}, p {r['p']}, q {r['q']}) -> {r['file']}"))


def _select_config(retain, couple, p, q, mode):
    from .select import SelectConfig

    if retain is None or not couple:
        raise typer.BadParameter("give --retain and at least one --couple (or --selection)")
    return SelectConfig(retain, tuple(couple), p, q, mode)


@app.command()
def patch(
    model: Annotated[Path, typer.Argument(help="Model directory or .safetensors file.")],
    output: Annotated[Optional[Path], typer.Argument(help="New output directory (omit with --in-place).")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Write zeros into MODEL itself, undo log first.")] = False,
    selection: Annotated[Optional[Path], typer.Option("--selection", "-s", help="Selection file from `spinctl select`.")] = None,
    retain: RetainOpt = None,
    couple: CoupleOpt = None,
    p: POpt = 5e-7,
    q: QOpt = 5e-7,
    mode: _mode_opt() = "paper",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be zeroed; write nothing.")] = False,
    link: Annotated[bool, typer.Option("--link", help="Hard-link shards with nothing to zero instead of copying them.")] = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip sha256 of the files (kernel-side copy; verify then checks zeros only).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow writing in place through symlinks.")] = False,
    wait: WaitOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Zero the selected weights: into a new directory OUT, or --in-place."""
    from .formats import SelectionFile, read_selection
    from .patch import PatchConfig, patch as run_patch

    if (selection is None) == (retain is None and not couple):
        raise typer.BadParameter("give either --selection or --retain/--couple/--p/--q")
    if in_place == (output is not None):
        raise typer.BadParameter("give either an output directory OUT or --in-place")
    if in_place and link:
        raise typer.BadParameter("--link only applies to out-of-place patching")
    cfg = PatchConfig(model, output, in_place, dry_run, link, no_hash, force, wait)
    if selection is not None:
        sel = read_selection(selection)
    else:
        from .select import run_select

        indices, meta = run_select(_select_config(retain, couple, p, q, mode))
        sel = SelectionFile(retain, meta, indices)  # errors then name a file the user gave
    with _progress(json_out, quiet) as progress:
        result = run_patch(cfg, sel, progress)
    emit(result, json_out, _print_patch)


def _print_patch(r: dict) -> None:
    t = r["totals"]
    where = "dry run, nothing written" if r["dry_run"] else r["output"]
    _console().print(f"zeroed [bold]{t['zeroed']}[/] elements in {t['tensors_touched']} tensors, "
                     f"{t['files_changed']}/{len(r['files'])} weight files changed -> {where}")


@app.command()
def verify(
    target: Annotated[Path, typer.Argument(help="Patched directory or .safetensors file.")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Check a patched checkpoint: every manifest hash matches and every selected weight is zero."""
    from .verify import verify as run_verify

    with _progress(json_out, quiet) as progress:
        result = run_verify(target, progress)
    emit(result, json_out, _print_verify)
    if not result["ok"]:
        raise typer.Exit(1)


def _print_verify(r: dict) -> None:
    hashes = "hashes match" if r["hashes_checked"] else "hashes not recorded (--no-hash): checked the zeros only"
    if r["ok"]:
        _console().print(f"[green]verified[/]: {r['selected']} selected weights are zero, {hashes} ({r['files']} files)")
    else:
        bad = r["hash_mismatches"] + r["nonzero_tensors"]
        print(f"verification failed for {r['target']}: {', '.join(bad[:5])}", file=sys.stderr)


@app.command()
def revert(
    target: Annotated[Path, typer.Argument(help="Patched directory or .safetensors file.")],
    output: Annotated[Optional[Path], typer.Argument(help="New directory for the restored checkpoint.")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Restore TARGET itself and remove the spin-* files.")] = False,
    wait: WaitOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Restore the original bytes from the undo log."""
    from .verify import revert as run_revert

    if in_place == (output is not None):
        raise typer.BadParameter("give either an output directory or --in-place")
    with _progress(json_out, quiet) as progress:
        result = run_revert(target, output, progress, wait=wait)
    emit(result, json_out, lambda r: _console().print(f"restored {r['restored']} weights in {r['files']} files -> {r['output']}"))


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Score file, selection file, checkpoint file or directory.")],
    json_out: JsonOpt = False,
):
    """Summarise a score file, a selection file or a checkpoint."""
    from .inspect import inspect as run_inspect

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


def _method_type():
    from .methods import Method  # a light module: the enum only, no torch

    return Method


def _sample_progress(rep):
    """Adapt score's progress(advance, total) callback to a rich task created on first use."""
    task = []

    def advance(n: int, total: int) -> None:
        if not task:
            task.append(rep.task("scoring samples", total))
        task[0](n)

    return advance


@app.command()
def score(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory (config, tokenizer, safetensors).")],
    data: Annotated[str, typer.Argument(help="Calibration CSV/JSONL with prompt and response columns, or builtin:NAME.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Score file to write (.safetensors).")],
    method: Annotated[_method_type(), typer.Option("--method", help="snip (|W|·Σ|∇W L|) or wanda (|W|·‖x‖).")] = "snip",
    nsamples: Annotated[int, typer.Option("--nsamples", help="Rows drawn from DATA.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the row permutation.")] = 0,
    keep: Annotated[float, typer.Option("--keep", help="Fraction of each tensor's top scores stored.")] = 1e-4,
    targets: Annotated[str, typer.Option("--targets", help="mlp, attn, all, or re:REGEX on weight names.")] = "mlp",
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sample; longer samples lose their end.")] = 2048,
    batch_size: Annotated[str, typer.Option("--batch-size", help="Samples per batch, or auto.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on cuda, f32 on cpu), float32, bfloat16, float16.")] = "auto",
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Format prompts with the tokenizer's chat template.")] = False,
    prompt_column: Annotated[str, typer.Option("--prompt-column", help="Name of the prompt column.")] = "prompt",
    response_column: Annotated[str, typer.Option("--response-column", help="Name of the response column.")] = "response",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model's own Python code (off by default).")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Load one decoder layer at a time: for models larger than memory.")] = False,
    spill_dir: Annotated[Optional[Path], typer.Option("--spill-dir", help="With --stream: keep layer activations in files in DIR, not in host memory.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Score every targeted weight on one calibration set; write the top-K per tensor."""
    from .score import ScoreConfig, score as run_score

    if batch_size != "auto" and not batch_size.isdigit():
        raise typer.BadParameter("--batch-size takes a positive integer or auto")
    cfg = ScoreConfig(model=model, data=data, output=output, method=method, nsamples=nsamples, seed=seed, keep=keep,
                      targets=targets, max_length=max_length, batch_size=None if batch_size == "auto" else int(batch_size),
                      device=device, dtype=dtype, chat_template=chat_template, prompt_column=prompt_column,
                      response_column=response_column, trust_remote_code=trust_remote_code, stream=stream,
                      spill_dir=spill_dir)
    with _progress(json_out, quiet, unit="samples") as rep:
        result = run_score(cfg, _sample_progress(rep))
    if distributed.is_main_process():  # under torchrun rank 0 speaks for the job
        emit(result, json_out, lambda r: _console().print(
            f"scored {r['tensors']} tensors on {r['samples']} samples ({r['tokens']} tokens, {r['skipped']} skipped) "
            f"in {r['seconds']:.1f} s -> {r['file']}"))


def _log(json_out: bool):
    """Stage messages on stderr, silent with --json."""
    if json_out:
        return lambda s: None
    from rich.console import Console

    err = Console(stderr=True)
    return lambda s: err.print(f"[dim]·[/] {s}")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="spin.yaml: model, output, retain, couple, score, select, patch, eval.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key, e.g. --set score.nsamples=64.")] = None,
    json_out: JsonOpt = False,
):
    """Score (cached), select, patch, verify and optionally evaluate, from one YAML file."""
    from .run import run as run_pipeline
    from .runconfig import load_run_config

    result = run_pipeline(load_run_config(config, set_ or []), _log(json_out))
    if distributed.is_main_process():  # under torchrun ranks > 0 only score; rank 0 reports
        emit(result, json_out, _print_run)


def _print_run(r: dict) -> None:
    cached = sum(s["cached"] for s in r["scores"])
    _console().print(f"{r['selected']} weights zeroed ({cached}/{len(r['scores'])} score files from cache), "
                     f"{'verified' if r['verified'] else 'NOT verified'} -> {r['output']}")


@app.command()
def demo(
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Where to build the demo (default: a new temp dir).")] = None,
    json_out: JsonOpt = False,
):
    """The whole pipeline on a tiny random Llama and the built-in calibration sets."""
    from .demo import report, run_demo

    result = run_demo(workdir, _log(json_out))
    emit(result, json_out, lambda r: report(r, _console()))


def _eval_config(model, prompts, column, limit, max_new_tokens, batch_size, judge, judge_model, judge_template, save, device, dtype):
    from .data import resolve
    from .evaluate import EvalConfig

    return EvalConfig(model=model, prompts=resolve(prompts), column=column, limit=limit, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, judge=judge, judge_model=judge_model, judge_template=judge_template,
                      save=save, device=device, dtype=dtype)


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Argument(help="Model directory to evaluate.")],
    prompts: Annotated[str, typer.Option("--prompts", help="CSV/JSONL of questions, or builtin:eval_prompts.")],
    column: Annotated[str, typer.Option("--column", help="Column holding the questions.")] = "questions",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N questions.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy tokens per answer.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions per generation batch.")] = 8,
    judge: Annotated[str, typer.Option("--judge", help="keyword (our refusal and caution markers) or model.")] = "keyword",
    judge_model: Annotated[Optional[Path], typer.Option("--judge-model", help="Local causal LM that answers safe/unsafe.")] = None,
    judge_template: Annotated[Optional[Path], typer.Option("--judge-template", help="Template with {question} and {answer}.")] = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write question, answer, verdict as JSONL.")] = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="A second (patched) model, evaluated the same way.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16.")] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Awareness rate: greedy answers judged aware / unaware (unjudgeable counted apart)."""
    from .evaluate import eval_steps, evaluate

    models = [model] + ([compare] if compare else [])
    results = []
    with _progress(json_out, quiet, unit="steps") as rep:
        for m in models:
            cfg = _eval_config(m, prompts, column, limit, max_new_tokens, batch_size, judge, judge_model,
                               judge_template, None if compare and save is None else save, device, dtype)
            results.append(evaluate(cfg, rep.task(f"evaluating {m.name}", eval_steps(cfg))))
    result = results[0] if not compare else {"original": results[0], "compare": results[1]}
    emit(result, json_out, lambda r: _print_eval(results))


def _print_eval(results: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="awareness")
    for col in ("model", "n", "aware", "unaware", "unjudgeable", "rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        rate = "n/a" if r["rate"] is None else f"{r['rate']:.4f}"
        table.add_row(r["model"], str(r["n"]), str(r["aware"]), str(r["unaware"]), str(r["unjudgeable"]), rate)
    _console().print(table)


@app.command()
def ppl(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    textfile: Annotated[Path, typer.Argument(help="Plain text file.")],
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per non-overlapping window.")] = 2048,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16.")] = "auto",
    json_out: JsonOpt = False,
):
    """Perplexity over non-overlapping windows of a text file."""
    from .ppl import perplexity

    result = perplexity(model, textfile, seqlen, device, dtype)
    emit(result, json_out, lambda r: _console().print(
        f"perplexity {r['ppl']:.4f} over {r['tokens']} tokens in {r['windows']} windows of {r['seqlen']}"))


def main() -> None:
    """Entry point: SpinctlError (and I/O failures) become one line on stderr and exit 1."""
    try:
        app()
    except (SpinctlError, OSError) as e:
        if os.environ.get("SPINCTL_DEBUG") == "1":
            raise
        if distributed.failure_reported() and not distributed.is_main_process():
            sys.exit(1)  # rank 0 has this failure and prints it, once, for the whole torchrun job
        msg = str(e) if isinstance(e, SpinctlError) else f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": ")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
