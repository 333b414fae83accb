"""Named pause points that let race tests stop a process at an exact step (SPINCTL_TEST_PAUSE=STEP:DIR)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from spinctl.errors import SpinctlError

ENV = "SPINCTL_TEST_PAUSE"


def pause(step: str) -> None:
    """At STEP: write DIR/STEP.reached, then wait until DIR/STEP.go exists. A no-op unless the env var names STEP.

    Races are otherwise timing luck; this makes the interleaving of two processes exact.
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, where = spec.partition(":")
    if want != step or not where:
        return
    d = Path(where)
    (d / f"{step}.reached").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (d / f"{step}.go").exists():
        if time.monotonic() > deadline:
            raise SpinctlError(f"{ENV}: nobody released {step} within 120 s")
        time.sleep(0.01)
