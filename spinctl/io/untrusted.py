"""Parsing untrusted JSON: malformed input, however deeply nested, is a ValueError with a short reason."""

from __future__ import annotations

import json

NESTED = "nested too deeply"


def loads(text: str | bytes, **kw):
    """json.loads, except that nesting past Python's recursion limit (`[` x 100000 is a few
    hundred kB) is a ValueError like any other malformed JSON, not a RecursionError: every
    caller already turns ValueError into its one-line message naming the file."""
    try:
        return json.loads(text, **kw)
    except RecursionError:
        raise ValueError(NESTED) from None


def require_regular(path) -> None:
    """An input read whole must be a regular file (or missing, or a directory: the caller says
    what that means): a FIFO would block the command forever, a device might never end."""
    import stat
    from pathlib import Path

    from spinctl.errors import InputError

    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"{path}: not a regular file (a FIFO, socket or device); give a file")


def read_json(path, missing: str, label: str = ""):
    """The JSON in a file, or an InputError: `PATH: {missing}` when there is no such file,
    `PATH: {label}not valid JSON (reason)` when it cannot be decoded or parsed."""
    from pathlib import Path

    from spinctl.errors import InputError

    require_regular(path)
    try:
        return loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {missing}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: {label}not valid JSON ({str(e).splitlines()[0]})") from None
