"""Verify a patched checkpoint against its manifest, and revert it bit for bit from its undo log."""

from __future__ import annotations

import os
from pathlib import Path

from spinctl.errors import InputError, OutputError
from spinctl.io import nonweight_edits
from spinctl.io.checkpoint import TensorEntry, read_shard, weight_file_names
from spinctl.io.edits import Edits, file_edits, read_ranges, stream, tensor_ranges, write_in_place
from spinctl.io.files import refuse_hard_links
from spinctl.io.lock import ModelLock
from spinctl.io.nonweights import copy_other_files
from spinctl.io.sidecars import (
    UndoEntry,
    check_undo,
    check_undo_recorded,
    read_manifest,
    read_undo,
    remove_stale_temps,
    sidecar_paths,
)
from spinctl.io.testpoint import pause
from spinctl.patch import check_output_dir, run_shards
from spinctl.progress import Reporter, Silent


def _root(target: Path) -> Path:
    return target.parent if target.is_file() else target


def _locate(target: Path) -> Path:
    """A file patched out of place sits in OUT with OUT's spin-* files: then OUT is the target."""
    target = Path(target)
    if target.is_file() and not sidecar_paths(target)[1].exists() and sidecar_paths(target.parent)[1].exists():
        return target.parent
    return target


def _load(target: Path) -> tuple[dict | None, dict[str, UndoEntry], dict[str, dict[str, TensorEntry]]]:
    """(manifest or None, undo entries, file -> tensors) of a patched file or directory."""
    target = Path(target)
    if not target.exists():
        raise InputError(f"{target}: no such file or directory")
    manifest_path, undo_path = sidecar_paths(target)
    manifest = read_manifest(manifest_path) if manifest_path.exists() else None
    if not undo_path.exists():
        raise InputError(f"{undo_path}: no undo log; {target} was not patched by spinctl, or was already reverted")
    _, undo = read_undo(undo_path)
    files = list(manifest["files"]) if manifest else [target.name] if target.is_file() else None
    if manifest is not None:
        _check_file_list(target, manifest_path, files)
    if files is None:  # an interrupted patch of a directory: its own weight files
        files = weight_file_names(target)
    layout = {}
    for rel in files:
        if "/" in rel or rel in ("", ".", ".."):
            raise InputError(f"{manifest_path}: file entry {rel!r} escapes the directory")
        layout[rel] = read_shard(_root(target) / rel).tensors
    check_undo(undo_path, undo, {n: t for tensors in layout.values() for n, t in tensors.items()})
    if manifest is not None:
        check_undo_recorded(undo_path, undo, manifest)
    return manifest, undo, layout


def _check_file_list(target: Path, manifest_path: Path, files: list[str]) -> None:
    """The manifest's files are the checkpoint's own (its index, or its .safetensors): a shard left out would go unchecked."""
    own = [target.name] if target.is_file() else weight_file_names(target)
    missing, extra = sorted(set(own) - set(files)), sorted(set(files) - set(own))
    if missing:
        raise InputError(
            f"{manifest_path}: weight file {missing[0]} of the checkpoint is not in the manifest; "
            "the manifest is incomplete or belongs to another checkpoint"
        )
    if extra:
        raise InputError(
            f"{manifest_path}: lists {extra[0]}, which is not a weight file of {target}; "
            "the manifest is corrupt or belongs to another checkpoint"
        )


def _edits(tensors: dict[str, TensorEntry], undo: dict[str, UndoEntry], restore: bool) -> Edits:
    items = [(t, undo[n].indices, undo[n].values if restore else None) for n, t in tensors.items() if n in undo]
    return file_edits(items)


def verify(target: Path, progress: Reporter | None = None) -> dict:
    """ok only if every manifest hash matches and every selected element reads zero.

    Runs under a shared lock on the model (docs/design.md §7, §9).

    Args:
        target: A patched directory or .safetensors file; a file that was patched out of
            place (its spin-* files are its directory's) stands for that directory.
        progress: Optional reporter of bytes hashed per weight file; silent when None.

    Returns:
        `ok`, `target` (the path verified), `hashes_checked` (false after `--no-hash`:
        only the zeros were checked), `files` (weight files), `selected` (elements in the
        undo log), `hash_mismatches` (files whose sha256 differs from the manifest's
        `output_sha256`) and `nonzero_tensors` (tensors with a logged element that is not
        zero). A failed check is reported here, not raised.

    Raises:
        InputError: `target` does not exist, has no undo log, has no manifest (an
            interrupted patch: rerun it or revert), or its manifest or undo log is
            malformed or does not match the checkpoint or each other.
        BusyError: An in-place patch or revert holds the model.
    """
    progress = progress or Silent()
    target = _locate(target)
    with ModelLock(target, exclusive=False) as lock:
        return _verify(target, lock, progress)


def _verify(target: Path, lock: ModelLock, progress: Reporter) -> dict:
    manifest, undo, layout = _load(target)
    lock.add(_root(target) / rel for rel in layout)
    if manifest is None:
        raise InputError(f"{sidecar_paths(target)[0]}: no manifest; the patch was interrupted: rerun it, or revert")
    nonzero = []
    for tensors in layout.values():
        for name, t in tensors.items():
            if name in undo and any(read_ranges(t.file, *tensor_ranges(t, undo[name].indices))):
                nonzero.append(name)
    mismatched = []
    if manifest.get("hashes"):

        def work(rel):
            advance = progress.task(f"verifying {rel}", os.path.getsize(_root(target) / rel))
            return rel, stream(_root(target) / rel, Edits.none(), hash_after=False, advance=advance)[0]

        for rel, digest in run_shards(list(layout), work):
            if digest != manifest["files"][rel].get("output_sha256"):
                mismatched.append(rel)
    # non-weight files spinctl edited (the README's report section): checked with or without --no-hash
    mismatched += nonweight_edits.mismatches(_root(target), manifest, sidecar_paths(target)[0])
    return {
        "ok": not nonzero and not mismatched,
        "target": str(target),
        "hashes_checked": bool(manifest.get("hashes")),
        "files": len(layout),
        "selected": sum(len(u.indices) for u in undo.values()),
        "hash_mismatches": mismatched,
        "nonzero_tensors": nonzero,
    }


def revert(target: Path, output: Path | None = None, progress: Reporter | None = None, wait: bool = False) -> dict:
    """Restore the original bytes: into `output` (a new directory), or in place when output is None.

    In place, every file to restore is first hashed as it would read once restored and
    compared with the manifest's `input_sha256`; only then are bytes written, and the
    manifest and the undo log (last) removed (docs/design.md §7, §8).

    Args:
        target: A patched directory or .safetensors file (as for `verify`); an interrupted
            in-place patch (undo log, no manifest) can be reverted too.
        output: A new or empty directory outside `target` for the restored checkpoint, or
            None to restore `target` itself (exclusive lock).
        progress: Optional reporter of bytes read per weight file; silent when None.
        wait: Wait for another spinctl's conflicting lock instead of failing.

    Returns:
        `output` (the restored directory or `target`), `files` (weight files),
        `restored` (elements restored) and `in_place`.

    Raises:
        InputError: `target` does not exist or has no undo log, its manifest or undo log is
            malformed or inconsistent, or (in place) restoring would not give the bytes
            whose sha256 the manifest recorded; nothing is written then.
        OutputError: `output` is not empty or lies inside the model's directory, a
            restored file does not match its recorded sha256 (out of place), a file to
            restore in place has several hard links, the model cannot be locked for
            writing, or the output cannot be written.
        BusyError: Another spinctl holds a conflicting lock and `wait` is false.
    """
    progress = progress or Silent()
    target = _locate(target)
    with ModelLock(target, exclusive=output is None, wait=wait) as lock:
        return _revert(target, output, lock, progress)


def _revert(target: Path, output: Path | None, lock: ModelLock, progress: Reporter) -> dict:
    manifest, undo, layout = _load(target)
    lock.add(_root(target) / rel for rel in layout)
    if output is None:
        remove_stale_temps(target)
        refuse_hard_links(_root(target) / rel for rel, tensors in layout.items() if any(n in undo for n in tensors))
        _check_restorable(target, manifest, undo, layout, progress)
        nonweight_edits.check_restorable(_root(target), manifest, sidecar_paths(target)[0])
        return _revert_in_place(target, manifest, undo, layout)
    output = Path(output)
    check_output_dir(output, target)
    from spinctl.io.files import staged_dir

    with staged_dir(output) as tmp:

        def work(rel):
            advance = progress.task(f"reverting {rel}", os.path.getsize(_root(target) / rel))
            return rel, stream(
                _root(target) / rel, _edits(layout[rel], undo, True), tmp / rel, hash_before=False, advance=advance
            )[1]

        for rel, digest in run_shards(list(layout), work):
            expected = (manifest or {}).get("files", {}).get(rel, {}).get("input_sha256")
            if expected and digest != expected:
                raise OutputError(
                    f"{_root(target) / rel}: restored bytes do not match the original sha256; the patched file was changed after patching"
                )
        if target.is_dir():
            copy_other_files(target, set(layout), tmp)
            nonweight_edits.restore(target, tmp, manifest, sidecar_paths(target)[0])
    return {
        "output": str(output),
        "files": len(layout),
        "restored": sum(len(u.indices) for u in undo.values()),
        "in_place": False,
    }


def _check_restorable(
    target: Path, manifest: dict | None, undo: dict[str, UndoEntry], layout: dict, progress: Reporter
) -> None:
    """Before any byte is written: each file, with the undo values applied, hashes to its recorded input sha256.

    Reads every file the patch changed (or the log now touches), so a revert in place costs a read of
    those files; without recorded input hashes (--no-hash, or an interrupted patch) the undo log's
    own sha256 and tensor counts (checked in _load) are all there is.
    """
    root, files = _root(target), (manifest or {}).get("files", {})
    todo = [
        rel
        for rel in layout
        if files.get(rel, {}).get("input_sha256")
        and (files[rel]["input_sha256"] != files[rel].get("output_sha256") or any(n in undo for n in layout[rel]))
    ]

    def work(rel):
        advance = progress.task(f"checking {rel}", os.path.getsize(root / rel))
        return rel, stream(root / rel, _edits(layout[rel], undo, True), None, hash_before=False, advance=advance)[1]

    for rel, digest in run_shards(todo, work) if todo else []:
        if digest != files[rel]["input_sha256"]:
            raise InputError(
                f"{sidecar_paths(target)[1]}: restoring {root / rel} from it would not give the original bytes "
                "(sha256 differs from the manifest's input_sha256); nothing was restored"
            )


def _revert_in_place(target: Path, manifest: dict | None, undo: dict[str, UndoEntry], layout: dict) -> dict:
    """Idempotent range writes, fsynced, then edited non-weight files, then the sidecars go (undo log last):
    a crash is fixed by rerunning."""
    root = _root(target)
    pause("revert-restoring")
    for rel, tensors in layout.items():
        write_in_place(root / rel, _edits(tensors, undo, True))
    manifest_path, undo_path = sidecar_paths(target)
    nonweight_edits.restore(root, root, manifest, manifest_path)
    manifest_path.unlink(missing_ok=True)
    undo_path.unlink()
    from spinctl.io.files import fsync_dir

    fsync_dir(root)
    return {
        "output": str(target),
        "files": len(layout),
        "restored": sum(len(u.indices) for u in undo.values()),
        "in_place": True,
    }
