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
