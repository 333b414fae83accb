"""The report's inputs, read and cross-checked: selection, score files, the patched model's manifest, evals.

`collect` returns the summary (plain JSON: what the Markdown, the terminal tables and
`--json` show) and the score arrays the distribution plot needs. Nothing is written here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl import __version__
from spinctl.config import ReportConfig
from spinctl.errors import InputError
from spinctl.io import untrusted
from spinctl.io.files import file_sha256
from spinctl.io.formats import ScoreFile, SelectionFile, read_scores, read_selection, top_count
from spinctl.io.nonweight_edits import KEY as EDITS_KEY
from spinctl.io.sidecars import read_manifest, sidecar_paths
from spinctl.report.evals import before_after

KIND_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2")  # Llama/Qwen2/Mistral, then OPT/GPT-2 style


@dataclass(frozen=True)
class ScoreSet:
    """One score file as the distribution plot draws it: every stored entry, and which are in the top set."""

    label: str
    role: str  # "retain" or "coupled"
    fraction: float  # p or q
    log_scores: np.ndarray  # log10 of every stored score, all tensors
    in_top: np.ndarray  # bool, per entry: rank < k = floor(fraction · n) of its tensor
    cutoffs: np.ndarray  # log10 of each tensor's cut-off score (its k-th largest), tensors with 1 <= k <= stored


@dataclass(frozen=True)
class Report:
    summary: dict
    sets: list[ScoreSet]


def _score_files(cfg: ReportConfig, sel: SelectionFile) -> list[tuple[Path, str, ScoreFile]]:
    """The score files the selection was made from (checked by sha256), as (path, sha256, file)."""
    want = [sel.meta["retain_sha256"], *sel.meta["couple_sha256"]]
    given = [cfg.retain, *cfg.couple]
    if len(given) != len(want):
        raise InputError(
            f"{cfg.selection}: was made from {len(want) - 1} coupled score files, got {len(given) - 1} --couple; "
            "give the score files the selection was made from, in order"
        )
    out = []
    for i, (path, sha) in enumerate(zip(given, want)):
        untrusted.require_regular(path)  # a FIFO would block the hash forever
        got = file_sha256(path) if Path(path).is_file() else None
        if got is None:
            raise InputError(f"{path}: no such score file")
        if got != sha:
            role = "retain" if i == 0 else f"coupled #{i}"
            raise InputError(
                f"{path}: not the {role} score file {cfg.selection} was made from (sha256 differs); "
                "give the score files the selection was made from, in order"
            )
        out.append((Path(path), got, read_scores(path)))
    return out


def _manifest(patched: Path, sel: SelectionFile) -> tuple[Path, dict, str]:
    """(path, manifest, sha256 of the manifest as the patch wrote it), checked against the selection."""
    patched = Path(patched)
    if not patched.exists():
        raise InputError(f"{patched}: no such patched model")
    path = sidecar_paths(patched)[0]
    if patched.is_file() and not path.exists() and sidecar_paths(patched.parent)[0].exists():
        path = sidecar_paths(patched.parent)[0]  # a lone file patched out of place: OUT's manifest
    manifest = read_manifest(path)
    params = {k: v for k, v in sel.meta.items() if k not in ("shapes", "kind", "format", "version")}
    recorded = manifest.get("parameters", {}).get("selection") if isinstance(manifest.get("parameters"), dict) else None
    counts = {n: len(a) for n, a in sel.indices.items() if len(a)}
    if recorded != params or manifest.get("tensors") != counts:
        raise InputError(
            f"{sel.path}: not the selection applied to {patched} (its parameters or counts differ from {path}); "
            "give the selection that patch used"
        )
    # --card records the README in the manifest afterwards; the hash shown is of the manifest as the patch
    # wrote it (the same serialisation, without that record), so it stays the same however often --card runs.
    if EDITS_KEY in manifest:
        data = (json.dumps({k: v for k, v in manifest.items() if k != EDITS_KEY}, indent=2) + "\n").encode()
        sha = hashlib.sha256(data).hexdigest()
    else:
        sha = file_sha256(path)
    return path, manifest, sha


def split_name(name: str) -> tuple[int | None, str]:
    """(layer, module kind) of a weight: model.layers.3.mlp.gate_proj.weight -> (3, "gate")."""
    m = re.search(r"(?:^|\.)(\d+)\.", name)
    parts = name.removesuffix(".weight").split(".")
    return (int(m.group(1)) if m else None), parts[-1].removesuffix("_proj")


def zeroed_grid(sel: SelectionFile) -> dict:
    """Zeroed weights per layer and module kind, with each cell's scored elements (for the fraction)."""
    cells: dict[tuple, list[int]] = {}
    for name, shape in sel.shapes.items():
        cell = cells.setdefault(split_name(name), [0, 0])
        cell[0] += len(sel.indices.get(name, ()))
        cell[1] += math.prod(shape)
    kinds = sorted({k for _, k in cells}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    layers = sorted({lay for lay, _ in cells}, key=lambda x: (x is None, x or 0))
    grid = [[cells.get((lay, k), [0, 0]) for k in kinds] for lay in layers]
    return {
        "layers": ["other" if lay is None else lay for lay in layers],
        "kinds": kinds,
        "zeroed": [[c[0] for c in row] for row in grid],
        "scored": [[c[1] for c in row] for row in grid],
    }


def score_set(label: str, role: str, f: ScoreFile, fraction: float) -> ScoreSet:
    logs, tops, cuts = [], [], []
    for name, scores in f.scores.items():
        k = top_count(fraction, math.prod(f.shapes[name]))
        logs.append(np.log10(scores.astype(np.float64)))
        tops.append(np.arange(len(scores)) < k)
        if 1 <= k <= len(scores):
            cuts.append(math.log10(float(scores[k - 1])))
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
    return ScoreSet(label, role, fraction, cat(logs, np.float64), cat(tops, bool), np.array(cuts, np.float64))


def _set_row(s: ScoreSet, path: Path, sha: str, f: ScoreFile) -> dict:
    m = f.meta
    cut = (lambda q: float(10 ** np.quantile(s.cutoffs, q))) if len(s.cutoffs) else (lambda q: None)
    return {
        "role": s.role,
        "label": s.label,
        "score_file": path.name,
        "score_sha256": sha,
        "dataset_sha256": m["dataset_sha256"],
        "dataset_rows": m["dataset_rows"],
        "samples": m.get("samples", m["nsamples"]),
        "method": m["method"],
        "fraction": s.fraction,
        "stored": int(len(s.log_scores)),
        "in_top": int(s.in_top.sum()),
        "cutoff_min": cut(0.0),
        "cutoff_median": cut(0.5),
        "cutoff_max": cut(1.0),
    }


def commands(cfg: ReportConfig, files: list[tuple[Path, str, ScoreFile]], sel: SelectionFile) -> list[str]:
    """The commands that make this selection and patch, from what the files record (MODEL and DATA by hash)."""
    out = []
    for i, (path, _, f) in enumerate(files):
        m = f.meta
        data = "RETAIN_DATA" if i == 0 else f"COUPLED_DATA_{i}"
        flags = f"--method {m['method']} --nsamples {m['nsamples']} --seed {m['seed']} --keep {m['keep']:g}"
        flags += f" --targets {m['targets']} --max-length {m['max_length']} --dtype {m['dtype']}"
        out.append(
            f"spinctl score MODEL {data} -o {path.name} {flags}"
            + (" --chat-template" if m.get("chat_template") else "")
        )
    couple = " ".join(f"--couple {p.name}" for p, _, _ in files[1:])
    m = sel.meta
    out.append(
        f"spinctl select --retain {files[0][0].name} {couple} --p {m['p']:g} --q {m['q']:g} --mode {m['mode']} -o {sel.path.name}"
    )
    out.append(f"spinctl patch MODEL {Path(cfg.patched).name} --selection {sel.path.name}")
    return out


def collect(
    cfg: ReportConfig, evals: list[tuple[str, dict]], recipe: dict | None = None, labels: list[str] | None = None
) -> Report:
    """Read and cross-check every input; `recipe` {"kind": "spin.yaml", "text"} overrides the reconstructed commands,
    `labels` name the retain and coupled sets (default: the score files' names)."""
    untrusted.require_regular(cfg.selection)  # a FIFO would block the read forever
    sel = read_selection(cfg.selection)
    files = _score_files(cfg, sel)
    manifest_path, manifest, manifest_sha = _manifest(cfg.patched, sel)
    labels = labels or [p.stem for p, _, _ in files]
    sets, rows = [], []
    for i, (path, sha, f) in enumerate(files):
        role, frac = ("retain", sel.meta["p"]) if i == 0 else ("coupled", sel.meta["q"])
        s = score_set(labels[i], role, f, frac)
        sets.append(s)
        rows.append(_set_row(s, path, sha, f))
    scored = sum(math.prod(s) for s in sel.shapes.values())
    zeroed = sum(len(a) for a in sel.indices.values())
    if recipe is None:
        recipe = {"kind": "commands", "lines": commands(cfg, files, sel)}
    summary = {
        "version": __version__,
        "patched": str(cfg.patched),
        "fingerprint": sel.meta["fingerprint"],
        "selection": {
            "file": sel.path.name,
            "sha256": file_sha256(sel.path),
            "mode": sel.meta["mode"],
            "p": sel.meta["p"],
            "q": sel.meta["q"],
        },
        "manifest": {"file": manifest_path.name, "sha256": manifest_sha, "undo_sha256": manifest.get("undo_sha256")},
        "zeroed": zeroed,
        "scored": scored,
        "tensors": len(sel.shapes),
        "tensors_touched": sum(1 for a in sel.indices.values() if len(a)),
        "weight_files": [
            {"file": rel, "zeroed": e.get("zeroed", 0), "sha256": e.get("output_sha256")}
            for rel, e in manifest["files"].items()
        ],
        "sets": rows,
        "grid": zeroed_grid(sel),
        "evals": before_after(evals, cfg.patched),
        "recipe": recipe,
    }
    return Report(summary, sets)
