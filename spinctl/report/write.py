"""The report directory: report.md, report.json and the PNGs, staged whole once every input is read and drawn."""

from __future__ import annotations

import contextlib
import json
import stat
from pathlib import Path

from spinctl.config import ReportConfig
from spinctl.errors import OutputError
from spinctl.io import untrusted
from spinctl.io.files import staged_dir, write_synced
from spinctl.report import card, plots
from spinctl.report.inputs import collect
from spinctl.report.markdown import report_markdown, summary_markdown

REPORT_FILES = ("report.md", "report.json", "zeroed_heatmap.png", "score_distributions.png", "eval_bars.png")


def check_report_dir(out: Path) -> None:
    """New, empty, or an earlier report (its files are replaced): never a directory holding anything else."""
    out = Path(out)
    if out.exists() and (
        not out.is_dir() or any(p.name not in REPORT_FILES or not _plain_file(p) for p in out.iterdir())
    ):
        raise OutputError(
            f"{out}: report directory holds other files; choose a new directory (an earlier report's files are replaced)"
        )


def _plain_file(p: Path) -> bool:
    """A file an earlier report wrote: regular, not a symlink (a FIFO named report.md is not a report's)."""
    return stat.S_ISREG(p.lstat().st_mode)


def write_report(
    cfg: ReportConfig, evals: list[tuple[str, dict]], recipe: dict | None = None, labels: list[str] | None = None
) -> dict:
    """Read and check everything, draw, then write the report (and with cfg.card the README section).

    `evals` are (where, JSON object) pairs of eval results; `recipe` a spin.yaml to quote
    ({"kind": "spin.yaml", "text", "overrides"}), else the commands are reconstructed.
    Nothing is written before every check has passed; the README section is written inside the
    report's staging, so a card that fails leaves no new report (an earlier one stays), and a
    report that fails after the card puts the manifest and README back.
    """
    out = Path(cfg.output)
    check_report_dir(out)
    report = collect(cfg, evals, recipe, labels)
    if cfg.card:
        card.check(cfg.patched)
    pngs = plots.render(report, cfg.bins) if plots.have_matplotlib() else {}
    skipped = None if pngs else plots.SKIPPED
    files = {
        "report.md": report_markdown(report.summary, list(pngs), skipped).encode(),
        "report.json": (json.dumps(report.summary, indent=2) + "\n").encode(),
        **pngs,
    }
    section = summary_markdown(report.summary) if cfg.card else None
    saved = card.snapshot(cfg.patched) if cfg.card else None
    carded = False
    try:
        # An earlier report is replaced whole, never file by file; through a symlink, where it points.
        with staged_dir(out.resolve() if out.is_symlink() else out, replace=True) as tmp:
            for name, data in files.items():
                write_synced(tmp / name, data)
            if section is not None:
                card.write(cfg.patched, section, saved)  # puts everything back itself if it fails
                carded = True
    except BaseException:
        if carded:  # the report could not be put in place: take the card back too
            with contextlib.suppress(Exception):  # the first failure is the one to report
                card.undo(cfg.patched, saved)
        raise
    return {
        "output": str(out),
        "files": [str(out / n) for n in files],
        "plots_skipped": skipped,
        "card": str(Path(cfg.patched) / card.README) if cfg.card else None,
        "summary": report.summary,
    }


def read_recipe(path: Path) -> dict:
    """spin.yaml quoted as it is (checked to be YAML, so a wrong file is caught)."""
    from spinctl.errors import InputError
    from spinctl.runconfig import parse_yaml

    untrusted.require_regular(path)  # a FIFO would block the read forever
    try:
        text = Path(path).read_text("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file (give the spin.yaml of the run)") from None
    if not isinstance(parse_yaml(text, str(path)), dict):
        raise InputError(f"{path}: not a spin.yaml (the top level must be a mapping of keys)")
    return {"kind": "spin.yaml", "text": text, "overrides": []}
