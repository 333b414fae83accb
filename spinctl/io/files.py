"""Atomic file output: temporary name in the destination directory, fsync, rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from spinctl.errors import OutputError


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; Linux >= 4.7)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry must reach the disk too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named(e: BaseException, final: Path, tmp: Path) -> BaseException:
    """An OSError of the output (disk full, read-only, quota) named after the output the user gave.

    A temporary name never survives the failure, so showing it would send the user looking
    for a file that is not there. Errors naming any other file (an input) pass unchanged.
    """
    if isinstance(e, OSError) and not isinstance(e, OutputError):
        name = getattr(e, "filename", None)
        if name is None or str(name).startswith(str(tmp)):
            return OutputError(f"cannot write {final}: {e.strerror or e}")
    return e


def temp_prefix(final: Path) -> str:
    """`.NAME.` for the temporary beside `final`, NAME cut to 200 characters: with the random
    part and `.tmp` a legal 255-character name would otherwise be too long for its own temporary."""
    return f".{Path(final).name[:200]}."


def _temp_failed(final: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot create {final}: {e.strerror or e} (in {final.parent})")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        # else the OSError would name the temporary file, which no longer exists when it is shown
        why = "is a directory; give a file name" if path.is_dir() else f"directory {path.parent} does not exist"
        raise OutputError(f"{path}: {why}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _temp_failed(path, e) from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: outputs get the modes any new file would
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        named = _named(e, path, tmp_path)
        if named is e:
            raise
        raise named from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_synced(path: Path, data: bytes) -> None:
    """Write a new file of a staged directory and fsync it: the directory's rename publishes it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `final`, then rename it into place.

    A run killed half-way leaves only a hidden `.NAME.*.tmp` directory, never a partial
    `final`. `final` must not exist, or be an empty directory (which is replaced); with
    `replace` it may be a full one the caller has checked, swapped out whole (`_swap_in`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    except OSError as e:
        raise _temp_failed(final, e) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: a serving account could not read OUT
        yield tmp
        fsync_dir(tmp)  # its entries reach the disk before the rename makes OUT look complete
        if replace and final.is_dir() and any(final.iterdir()):
            _swap_in(tmp, final)
        else:
            if final.exists():
                final.rmdir()  # empty by contract; rmdir refuses anything else
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _named(e, final, tmp)
        if named is e:
            raise
        raise named from None


def _swap_in(new: Path, final: Path) -> None:
    """Replace the full directory `final` by `new`: the old one is renamed aside first.

    rename(2) cannot put a directory over a non-empty one, so there are two renames; a
    process killed between them leaves no `final` but the old one whole as a hidden
    `.NAME.*.old`, never a mix of old and new files. A failed second rename puts it back.
    """
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    try:
        os.replace(final, old)  # a rename may replace an empty directory
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def refuse_hard_links(paths) -> None:
    """In-place writes go to the inode: through a second name they would change another model too (`--link` outputs)."""
    for path in paths:
        n = os.stat(path).st_nlink
        if n > 1:
            raise OutputError(
                f"{path}: has {n} hard links, so writing it in place would change the other names too "
                f"(another model, or a `patch --link` output); break the link first "
                f"(cp {path} {path}.copy && mv {path}.copy {path}), or patch out of place"
            )


def refuse_input_as_output(output: Path | None, inputs, dirs=(), flag: str = "-o") -> None:
    """An output must not be a file the command reads: one of `inputs` (also through another
    name: a symlink or a hard link), or an existing file inside one of `dirs` (a model
    directory, whose config, tokenizer and weights are all read). Checked before any work."""
    if output is None:
        return
    out = Path(output)
    for p in inputs:
        p = Path(p)
        if out.resolve() == p.resolve() or (out.exists() and p.exists() and os.path.samefile(out, p)):
            raise OutputError(f"{output}: is an input of this command ({p}); choose another {flag}")
    for d in dirs:
        d = Path(d).resolve()
        if out.exists() and d.is_dir() and out.resolve().is_relative_to(d):
            raise OutputError(f"{output}: is a file of the model directory {d}; choose another {flag}")


def check_creatable(path: Path, what: str) -> None:
    """`path` can be made with its missing parents: its nearest existing ancestor is a directory
    (else mkdir fails late, with a bare "File exists")."""
    parent = next(p for p in Path(path).absolute().parents if p.exists())
    if not parent.is_dir():
        raise OutputError(f"{path}: {what} cannot be made: {parent} is not a directory")


def check_output_file(output: Path | None, inputs=(), dirs=(), flag: str = "-o") -> None:
    """Before any work, for a command that writes `output` but does not create its directory:
    it is a file name in an existing directory, and no input (refuse_input_as_output)."""
    if output is None:
        return
    if Path(output).is_dir():
        raise OutputError(f"{output}: is a directory; give {flag} a file name")
    if not Path(output).parent.is_dir():
        raise OutputError(f"cannot write {output}: its directory does not exist")
    refuse_input_as_output(output, inputs, dirs, flag)
