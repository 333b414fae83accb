"""The spinctl command line: parses, calls the library, prints. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

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
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Zero the selected weights: into a new directory OUT, or --in-place."""
    from .formats import SelectionFile, read_selection
    from .patch import PatchConfig, patch as run_patch

    if (selection is None) == (retain is None and not couple):
        raise typer.BadParameter("give either --selection or --retain/--couple/--p/--q")
    cfg = PatchConfig(model, output, in_place, dry_run, link, no_hash, force)
    if selection is not None:
        sel = read_selection(selection)
    else:
        from .select import run_select

        indices, meta = run_select(_select_config(retain, couple, p, q, mode))
        sel = SelectionFile(Path("<computed>"), meta, indices)
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
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Restore the original bytes from the undo log."""
    from .verify import revert as run_revert

    if in_place == (output is not None):
        raise typer.BadParameter("give either an output directory or --in-place")
    with _progress(json_out, quiet) as progress:
        result = run_revert(target, output, progress)
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


def main() -> None:
    """Entry point: SpinctlError (and I/O failures) become one line on stderr and exit 1."""
    try:
        app()
    except (SpinctlError, OSError) as e:
        if os.environ.get("SPINCTL_DEBUG") == "1":
            raise
        msg = str(e) if isinstance(e, SpinctlError) else f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": ")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
