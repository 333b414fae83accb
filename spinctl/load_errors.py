"""Why transformers could not load a model, in one line: its warnings kept quiet during a load,
the exception types a bad config.json or checkpoint raises, and their reasons worded (a field
of the wrong type, a zero count, an unknown rope_type); special-token ids checked before
generation. transformers is imported inside the functions: `--help` must not load it."""

from __future__ import annotations

import contextlib
from pathlib import Path

from spinctl.errors import InputError, one_line
from spinctl.io import untrusted


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off for a load: its LOAD REPORT table, unknown model_type or rope_type
    notes. What goes wrong is raised and said in our one line; the level is restored after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_error_types() -> tuple[type[BaseException], ...]:
    """What transformers raises on a bad config.json or checkpoint: its own errors and those of the
    libraries under it (huggingface_hub's config validation, safetensors' header checks)."""
    types: list[type[BaseException]] = [
        OSError,
        ValueError,
        KeyError,
        TypeError,
        ImportError,
        RuntimeError,  # RecursionError too
        ArithmeticError,  # num_attention_heads 0: a modulo by zero in the config's checks
        AttributeError,
        IndexError,
    ]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import StrictDataclassError

        types.append(StrictDataclassError)
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        types.append(SafetensorError)
    return tuple(types)


def load_reason(path: Path, e: BaseException) -> str:
    """One line saying why transformers could not load the model at `path`."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        StrictDataclassError = ()  # noqa: N806
    if isinstance(e, StrictDataclassError) and e.__cause__ is not None:
        # "Validation error for field 'hidden_size':" on one line, the reason on the next
        return f"config.json: {one_line(e.__cause__)}"
    if isinstance(e, ZeroDivisionError):
        zeros = _zero_sizes(path)
        return f"config.json: {zeros[0]} is 0" if zeros else f"config.json: a division by zero ({e})"
    if isinstance(e, KeyError):
        # transformers only warns at an unknown rope_type, then fails to look it up building the model
        if e.args and e.args[0] in _rope_types(path):
            return f"config.json: unknown rope_type {e.args[0]!r}"
        return f"KeyError: {one_line(e)}"
    return one_line(e)


def _raw_config(path: Path) -> dict:
    """config.json as plain JSON (for wording errors only); {} when unreadable."""
    try:
        raw = untrusted.loads((Path(path) / "config.json").read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _zero_sizes(path: Path) -> list[str]:
    """Keys of config.json that are counts or sizes set to 0 (num_attention_heads 0)."""
    return [
        k
        for k, v in _raw_config(path).items()
        if v == 0
        and isinstance(v, int)
        and not isinstance(v, bool)
        and (k.startswith("num_") or k.endswith(("_size", "_heads", "_dim", "_layers")))
    ]


def _rope_types(path: Path) -> list[str]:
    """The rope_type (or legacy type) values of config.json's rope_scaling / rope_parameters, nested per layer type or not."""
    out = []
    raw = _raw_config(path)
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if not isinstance(rope, dict):
            continue
        for params in (rope, *(v for v in rope.values() if isinstance(v, dict))):
            out += [params[k] for k in ("rope_type", "type") if isinstance(params.get(k), str)]
    return out


GENERATION_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def check_generation_config(path: Path, model) -> None:
    """Refuse special-token ids that are not integers (`"eos_token_id": "abc"`): generate() would
    fail on them deep inside torch. Read from generation_config.json, else config.json."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    source = "generation_config.json" if (Path(path) / "generation_config.json").is_file() else "config.json"

    def is_id(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in GENERATION_TOKEN_KEYS:
        value = getattr(gen, key, None)
        if value is None or is_id(value) or (isinstance(value, list) and all(map(is_id, value))):
            continue
        raise InputError(
            f"{Path(path) / source}: {key} must be a token id or a list of token ids, got {value!r}; fix or remove it"
        )
