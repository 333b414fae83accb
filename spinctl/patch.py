"""Patching (docs/design.md §6): zero the selected elements out of place (streamed, hashed) or in place (undo log first)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl import __version__
from spinctl.config import PatchConfig
from spinctl.errors import InputError, OutputError
from spinctl.io.checkpoint import Checkpoint, Shard, is_reserved, open_checkpoint
from spinctl.io.edits import Edits, copy_then_pwrite, file_edits, read_ranges, stream, tensor_ranges, write_in_place
from spinctl.io.files import refuse_hard_links
from spinctl.io.formats import SelectionFile
from spinctl.io.lock import ModelLock
from spinctl.io.nonweights import copy_other_files
from spinctl.io.sidecars import (
    MANIFEST,
    UNDO,
    UndoEntry,
    check_undo,
    file_sha256,
    read_undo,
    refuse_stacked,
    remove_stale_temps,
    sidecar_paths,
    write_manifest,
    write_undo,
)
from spinctl.io.testpoint import pause
from spinctl.progress import Reporter, Silent


@dataclass(frozen=True)
class ShardPlan:
    shard: Shard
    rel: str  # file name relative to the checkpoint root
    selected: dict[str, np.ndarray]  # tensor -> sorted flat indices, non-empty only
    edits: Edits

    @property
    def zeroed(self) -> int:
        return sum(len(a) for a in self.selected.values())


def plan(ck: Checkpoint, sel: SelectionFile) -> list[ShardPlan]:
    """Check the selection belongs to this model, then group its zero ranges per shard."""
    if sel.meta["fingerprint"] != ck.fingerprint():
        raise InputError(f"{sel.path}: selection was made for another model (fingerprint differs from {ck.path})")
    for name, shape in sel.shapes.items():
        t = ck.tensors.get(name)
        if t is None or list(t.shape) != list(shape):
            raise InputError(f"{sel.path}: tensor {name} {shape} does not match {ck.path}")
        t.require_zeroable()
    plans = []
    for shard in ck.shards:
        selected = {n: sel.indices[n] for n in shard.tensors if n in sel.indices and len(sel.indices[n])}
        edits = file_edits([(shard.tensors[n], idx, None) for n, idx in selected.items()])
        plans.append(ShardPlan(shard, shard.path.name, selected, edits))
    return plans


def undo_entries(plans: list[ShardPlan]) -> dict[str, UndoEntry]:
    """The original bytes of every element about to be zeroed, read before anything is written."""
    out = {}
    for p in plans:
        for name, idx in p.selected.items():
            t = p.shard.tensors[name]
            out[name] = UndoEntry(t.dtype, idx, read_ranges(p.shard.path, *tensor_ranges(t, idx)))
    return out


def manifest(
    cfg: PatchConfig,
    sel: SelectionFile,
    plans: list[ShardPlan],
    hashes: dict[str, tuple],
    undo_sha256: str | None = None,
) -> dict:
    per_tensor = {n: int(len(a)) for p in plans for n, a in sorted(p.selected.items())}
    files = {}
    for p in plans:
        entry = {"zeroed": p.zeroed, "changed": bool(p.edits)}
        if p.rel in hashes:
            entry["input_sha256"], entry["output_sha256"] = hashes[p.rel]
        files[p.rel] = entry
    params = {k: v for k, v in sel.meta.items() if k not in ("shapes", "kind", "format", "version")}
    return {
        "tool": "spinctl",
        "version": __version__,
        "command": "patch",
        "parameters": {"selection": params, "in_place": cfg.in_place, "link": cfg.link, "no_hash": cfg.no_hash},
        "fingerprint": sel.meta["fingerprint"],
        "hashes": not cfg.no_hash,
        "files": files,
        "tensors": per_tensor,
        **({"undo_sha256": undo_sha256} if undo_sha256 else {}),  # recorded even with --no-hash: the log is small
        "totals": {
            "zeroed": sum(per_tensor.values()),
            "tensors_touched": len(per_tensor),
            "files_changed": sum(1 for p in plans if p.edits),
        },
    }


def patch(cfg: PatchConfig, sel: SelectionFile, progress: Reporter | None = None) -> dict:
    """Apply a selection; returns the manifest (with `output` and `dry_run` added).

    Out of place the output is built in a staging directory and renamed to `cfg.output`;
    in place the undo log is written and fsynced before any weight byte changes, and the
    manifest is written last (docs/design.md §6, §8).

    Args:
        cfg: The model (directory or .safetensors file), `output` or `in_place`, and the
            `dry_run`, `link`, `no_hash`, `force` and `wait` options.
        sel: The selection to apply; it must have been made for this model (same
            fingerprint and tensor shapes).
        progress: Optional reporter of bytes streamed per weight file (copy or hash);
            silent when None.

    Returns:
        The manifest as written to spin-manifest.json (`tool`, `version`, `command`,
        `parameters`, `fingerprint`, `hashes`, `files`, `tensors`, `undo_sha256`,
        `totals`), plus `output` (the output directory, or the model itself in place)
        and `dry_run`. A dry run returns the manifest it would write, without sha256
        values or `undo_sha256`, with `output` None, and writes nothing.

    Raises:
        InputError: The model or selection is malformed, the selection was made for
            another model or names a tensor the model lacks or shapes differently, a
            lone weight file has a name reserved for spinctl's sidecars, or the model
            already carries an undo log or manifest of an earlier patch.
        UnsupportedError: The selection names a tensor whose dtype cannot be zeroed
            byte-wise (not an IEEE float).
        OutputError: The output directory is not empty or lies inside the input; in
            place, a shard to write is a symlink (without `cfg.force`) or has several
            hard links, the model is already patched, an interrupted patch with another
            selection left its undo log, or the model cannot be locked for writing; or
            an output cannot be written.
        BusyError: Another spinctl holds a conflicting lock on the model and `cfg.wait`
            is false.
    """
    progress = progress or Silent()
    # in place: the only writer; out of place: one of any number of readers, never beside a writer
    with ModelLock(cfg.model, exclusive=cfg.in_place and not cfg.dry_run, wait=cfg.wait) as lock:
        ck = open_checkpoint(cfg.model)
        lock.add(s.path for s in ck.shards)
        if ck.is_file and is_reserved(ck.path.name):
            raise InputError(f"{ck.path}: the name is reserved for spinctl's undo logs and manifests; rename the file")
        refuse_stacked(ck.path, in_place=cfg.in_place)
        plans = plan(ck, sel)
        if cfg.dry_run:
            return manifest(cfg, sel, plans, {}) | {"output": None, "dry_run": True}
        if cfg.in_place:
            return _patch_in_place(cfg, ck, sel, plans, progress)
        return _patch_out(cfg, ck, sel, plans, progress)


def check_output_dir(out: Path, model: Path) -> None:
    """OUT must be new or empty, and must not be (or sit inside) the input."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: output directory is not empty; choose a new directory")
    src = model.resolve() if model.is_dir() else model.resolve().parent
    if out.resolve() == src or src in out.resolve().parents:
        raise OutputError(f"{out}: output must be outside the input model directory {src}")


def run_shards(jobs, work) -> list:
    """Shards in parallel: file I/O and sha256 release the GIL, so threads overlap them."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1, 4))) as pool:
        return list(pool.map(work, jobs))


def _patch_out(
    cfg: PatchConfig, ck: Checkpoint, sel: SelectionFile, plans: list[ShardPlan], progress: Reporter
) -> dict:
    from spinctl.io.files import staged_dir

    out = Path(cfg.output)
    check_output_dir(out, ck.path)
    undo = undo_entries(plans)
    pause("patch-copying")

    def work(p: ShardPlan):
        src, dst = p.shard.path, tmp / p.rel
        advance = progress.task(f"patching {p.rel}", p.shard.size)
        if cfg.link and not p.edits and _try_link(src, dst):
            h = None if cfg.no_hash else stream(src, p.edits, None, advance=advance)
        elif cfg.no_hash:
            copy_then_pwrite(src, dst, p.edits)
            advance(p.shard.size)
            h = None
        else:
            h = stream(src, p.edits, dst, advance=advance)
        return p.rel, h

    with staged_dir(out) as tmp:
        hashes = {rel: h for rel, h in run_shards(plans, work) if h}
        if not ck.is_file:
            copy_other_files(ck.root, {s.path.name for s in ck.shards}, tmp)
        undo_sha = write_undo(tmp / UNDO, undo, sel.meta["fingerprint"])
        m = manifest(cfg, sel, plans, hashes, undo_sha)
        write_manifest(tmp / MANIFEST, m)
    return m | {"output": str(out), "dry_run": False}


def _try_link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError:  # another filesystem, or links not allowed: copy instead
        return False


def _patch_in_place(
    cfg: PatchConfig, ck: Checkpoint, sel: SelectionFile, plans: list[ShardPlan], progress: Reporter
) -> dict:
    manifest_path, undo_path = sidecar_paths(ck.path)
    remove_stale_temps(ck.path)
    if not cfg.force:
        links = [p.shard.path for p in plans if p.edits and p.shard.path.is_symlink()]
        if links:
            raise OutputError(
                f"{links[0]}: is a symlink (a Hugging Face cache blob?); writing would change every model sharing it. Copy the model, or pass --force"
            )
    refuse_hard_links(p.shard.path for p in plans if p.edits)  # --force or not: the other names are other models
    if undo_path.exists():
        undo = _resume_undo(undo_path, manifest_path, plans)
        undo_sha = file_sha256(undo_path)
    else:
        pause("patch-reading-originals")
        undo = undo_entries(plans)
        undo_sha = write_undo(
            undo_path, undo, sel.meta["fingerprint"]
        )  # the write-ahead log, fsynced before any range write
    pause("patch-undo-written")
    for p in plans:
        write_in_place(p.shard.path, p.edits)
    hashes = {} if cfg.no_hash else _hash_in_place(plans, undo, progress)
    m = manifest(cfg, sel, plans, hashes, undo_sha)
    write_manifest(manifest_path, m)  # written last: its presence marks a finished patch
    return m | {"output": str(ck.path), "dry_run": False}


def _resume_undo(undo_path: Path, manifest_path: Path, plans: list[ShardPlan]) -> dict[str, UndoEntry]:
    """An undo log without a manifest is an interrupted patch: resume it if it is the same selection."""
    if manifest_path.exists():
        raise OutputError(
            f"{undo_path}: the model is already patched; run `spinctl revert --in-place` first (a second undo log would lose the original bytes)"
        )
    _, undo = read_undo(undo_path)
    check_undo(undo_path, undo, {n: t for p in plans for n, t in p.shard.tensors.items()})
    wanted = {n: a for p in plans for n, a in p.selected.items()}
    if set(undo) != set(wanted) or any(not np.array_equal(undo[n].indices, wanted[n]) for n in wanted):
        raise OutputError(
            f"{undo_path}: an interrupted patch with another selection left this undo log; run `spinctl revert --in-place` first"
        )
    return undo


def _hash_in_place(plans: list[ShardPlan], undo: dict[str, UndoEntry], progress: Reporter) -> dict[str, tuple]:
    """One read per shard: the patched bytes give the output hash; restoring the undo values gives the input hash."""

    def work(p: ShardPlan):
        advance = progress.task(f"hashing {p.rel}", p.shard.size)
        restore = file_edits([(p.shard.tensors[n], undo[n].indices, undo[n].values) for n in p.selected])
        after, before = stream(p.shard.path, restore, None, advance=advance)
        return p.rel, (before, after)

    return dict(run_shards(plans, work))
