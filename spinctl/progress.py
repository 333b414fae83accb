"""Progress reporting: library code calls a Reporter; the CLI picks rich bars on stderr or silence."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[[int], None]


class Reporter(Protocol):
    def task(self, description: str, total: int) -> Advance: ...


class Silent:
    def task(self, description: str, total: int) -> Advance:
        return lambda n: None


class RichReporter:
    """One bar per task; rich's Progress is thread-safe, so shard workers may advance it."""

    def __init__(self, progress):
        self._progress = progress

    def task(self, description: str, total: int) -> Advance:
        tid = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(tid, n)


@contextlib.contextmanager
def reporter(enabled: bool, unit: str = "bytes") -> Iterator[Reporter]:
    """Rich bars on stderr when enabled and stderr is a terminal; otherwise silence."""
    if not (enabled and sys.stderr.isatty()):
        yield Silent()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        yield RichReporter(p)
