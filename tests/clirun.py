"""Running the real CLI (`python -m spinctl ...`) from tests: the one place that builds its command line and environment.

`cli(*args)` runs it to completion, `start(*args)` in the background, `python(*args)` runs another
script in the same environment. (Not named `spinctl`: that would shadow the package in a test
module that also does `import spinctl.patch`.)

A plain module, not a fixture: the runner is called from module-level helpers that other test
modules import (pairdata's score files, test_bad_inputs' `World` and `assert_clean_failure`
cases, test_crash's `Paused`), from module-scoped fixtures that fan out over a thread pool,
and from lambdas built at collection time; a fixture would have to be threaded through each
of those as an argument.

The child's environment is this process's, minus SPINCTL_DEBUG (which turns the one-line
error into a traceback: a developer's shell must not change what the tests see), with `env`
applied on top: a value of None removes that variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

TIMEOUT = 600  # seconds; no CLI call in the tests comes near it, a hung one fails instead of blocking the suite


def child_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "SPINCTL_DEBUG"}
    for k, v in (env or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = str(v)
    return out


def argv(*args) -> list[str]:
    """The command line for `spinctl ARGS...` (each argument through str: Paths welcome)."""
    return [sys.executable, "-m", "spinctl", *map(str, args)]


def cli(
    *args,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | str | None = None,
    timeout: float | None = TIMEOUT,
    check: bool = False,
    **kw,
) -> subprocess.CompletedProcess:
    """Run `python -m spinctl ARGS...` to completion: a CompletedProcess with text stdout and stderr.

    check=True asserts exit status 0 (the message is the process's stderr). Other keyword
    arguments (input=, preexec_fn=, ...) go to subprocess.run; TimeoutExpired propagates.
    """
    r = subprocess.run(argv(*args), capture_output=True, text=True, env=child_env(env), cwd=cwd, timeout=timeout, **kw)
    assert not check or r.returncode == 0, r.stderr
    return r


def python(
    *args,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | str | None = None,
    timeout: float | None = TIMEOUT,
    **kw,
) -> subprocess.CompletedProcess:
    """`python ARGS...` (e.g. -c CODE) with the same environment and output handling as `cli`."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=child_env(env),
        cwd=cwd,
        timeout=timeout,
        **kw,
    )


def start(*args, env: Mapping[str, str | None] | None = None, cwd: Path | str | None = None) -> subprocess.Popen:
    """`python -m spinctl ARGS...` started in the background, stdout and stderr piped as text."""
    return subprocess.Popen(
        argv(*args), env=child_env(env), cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
