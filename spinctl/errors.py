"""Project exceptions: the CLI catches SpinctlError once and prints its message as one line."""


class SpinctlError(Exception):
    """A failure the user can act on; the message names the file or tensor and what to do."""


class InputError(SpinctlError):
    """An input file is missing, malformed, or does not match the others."""


class OutputError(SpinctlError):
    """The output cannot be written where it was asked for."""


class UnsupportedError(SpinctlError):
    """The input is well formed but spinctl cannot handle it (dtype, architecture)."""


class UsageError(InputError):
    """An option's value is malformed or out of range: the CLI exits 2, like click's own usage errors."""


class BusyError(SpinctlError):
    """Another spinctl process holds the model's lock."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    if isinstance(e, RecursionError):  # json inside transformers, on a config or tokenizer file nested `[` x 100000
        return "a JSON file of the model is nested too deeply"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
