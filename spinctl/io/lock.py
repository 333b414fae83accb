"""Advisory locks on a model: flock on its directory (or lone file) and its weight files; one writer or many readers."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

from spinctl.errors import BusyError, InputError, OutputError


class ModelLock:
    """`with ModelLock(target, exclusive, wait) as lock: lock.add(shards)`.

    flock on an fd opened O_RDONLY (Linux allows it on a directory): no lock file is created,
    so a read-only model can still be read under a shared lock. The weight files are locked
    too, in the same mode, so a lone shard patched or reverted as a file and its directory
    exclude each other. Locks go with the open file descriptions: a killed process drops them.
    """

    def __init__(self, target: Path, exclusive: bool, wait: bool = False):
        self.target, self.exclusive, self.wait = Path(target), exclusive, wait
        self._fds: list[int] = []
        self._inodes: set[tuple[int, int]] = set()

    def __enter__(self) -> ModelLock:
        try:
            self.add([self.target])
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def add(self, paths: Iterable[Path]) -> None:
        """Lock more files of the model; a file already locked (same inode) is skipped: flock would deadlock on it."""
        for path in sorted(map(Path, paths)):  # one order in every process: --wait cannot deadlock
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                raise InputError(f"{path}: no such file or directory") from None
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in self._inodes:
                os.close(fd)
                continue
            self._fds.append(fd)
            self._inodes.add((st.st_dev, st.st_ino))
            self._flock(fd)

    def _flock(self, fd: int) -> None:
        mode = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | (0 if self.wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            raise BusyError(
                f"{self.target}: another spinctl is patching or reverting this model (or reading it); "
                "retry when it has finished, or pass --wait"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
                raise
            if self.exclusive:  # a filesystem without locks: an in-place write could race unseen
                raise OutputError(
                    f"{self.target}: cannot lock the model for writing ({e.strerror}); "
                    "patch a copy out of place instead"
                ) from None
            # reading without a lock on such a filesystem: the out-of-place output is hashed anyway

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())
