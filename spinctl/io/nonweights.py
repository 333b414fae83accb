"""A model's non-weight files (config, tokenizer, templates, code) copied into an output: regular files only."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from spinctl.errors import InputError
from spinctl.io.checkpoint import WEIGHT_SUFFIXES
from spinctl.io.files import fsync_dir


def _allowed_roots(root: Path) -> list[Path]:
    """Where a link may point: the model directory, and a Hugging Face cache snapshot's own blob store."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev> -> <cache>/models--org--name/blobs
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def list_other_files(root: Path, weight_names: set[str]) -> list[tuple[Path, Path]]:
    """(relative path in OUT, real source path) of every file to copy; raises before anything is copied.

    Left out: hidden entries, the weights (any weight suffix: another copy would carry them
    unpatched) and spin-* at the top. Refused: links pointing outside the model (they would copy
    someone else's file into OUT), dangling links, and devices, FIFOs and sockets (never opened:
    `tokenizer.model -> /dev/zero` would never end).
    """
    root = Path(root)
    roots = _allowed_roots(root)
    weights = {(root / n).resolve() for n in weight_names}
    out: list[tuple[Path, Path]] = []

    def visit(d: Path, rel: Path, seen: tuple[Path, ...]) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            name, path = entry.name, Path(entry.path)
            if name.startswith("."):
                continue
            if rel == Path(".") and (name in weight_names or name.startswith("spin-")):
                continue
            real = path.resolve() if entry.is_symlink() else Path(os.path.realpath(path))
            if entry.is_symlink() and not _inside(real, roots):
                raise InputError(
                    f"{path}: symlink to {os.readlink(path)} points outside the model directory; "
                    "replace it with a copy of the file, or remove it"
                )
            try:
                st = os.stat(real)
            except FileNotFoundError:
                raise InputError(
                    f"{path}: broken symlink to {os.readlink(path)}; remove it or restore its target"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                if real in seen:
                    raise InputError(f"{path}: symlink loop (points back to {real})")
                visit(real, rel / name, seen + (real,))
            elif not stat.S_ISREG(st.st_mode):
                raise InputError(
                    f"{path}: not a regular file (a device, FIFO or socket); spinctl copies only regular "
                    "files into the output; remove it from the model directory"
                )
            elif Path(name).suffix in WEIGHT_SUFFIXES or real in weights:
                continue  # another copy of the weights would carry them unpatched
            else:
                out.append((rel / name, real))

    visit(root, Path("."), (root.resolve(),))
    return out


def copy_other_files(root: Path, weight_names: set[str], dst: Path) -> None:
    """Copy them into `dst` (the staged output), each fsynced, then each directory, so a power loss keeps them."""
    dirs = {dst}
    for rel, src in list_other_files(root, weight_names):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        dirs.update(p for p in (target.parent, *target.parent.parents) if dst in p.parents)
        _copy_regular(src, target)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def _copy_regular(src: Path, dst: Path) -> None:
    # O_NONBLOCK: should the file have become a FIFO since it was listed, opening does not hang; fstat then refuses it
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with open(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{src}: not a regular file; spinctl copies only regular files into the output")
        with open(dst, "xb") as fout:  # mode 0666 less the umask, like any new file
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
