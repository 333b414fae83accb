"""Typer flags derived from config.py's options, so each option is written down once."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, Optional

import typer

from spinctl.config import flag_name, options


def _typer_type(cls, f) -> Any:
    """The type Typer parses a field as: Opt.cli where given, else the field's own, None allowed."""
    opt = f.metadata["opt"]
    hint = typing.get_type_hints(cls)[f.name]
    optional = f.default is None or type(None) in typing.get_args(hint)
    base = opt.cli
    if base is None:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else hint
    return Optional[base] if optional else base  # noqa: UP045 (a runtime type for Typer)


def _default(f) -> Any:
    return f.default.value if isinstance(f.default, Enum) else f.default


def with_options(*classes) -> Callable:
    """Decorator: the command also takes every CLI option of `classes` as a flag, and receives
    their values as one dict in its `opts` parameter (where the flags appear in --help)."""
    fields = [(cls, f) for cls in classes for f in options(cls)]

    def decorate(func):
        own = inspect.signature(func, eval_str=True).parameters.values()
        derived = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=_default(f),
                annotation=Annotated[
                    _typer_type(cls, f),
                    typer.Option(
                        flag_name(f.name),
                        help=_help(f),
                        metavar=f.metadata["opt"].metavar or None,
                        show_default=f.default is not None,
                    ),
                ],
            )
            for cls, f in fields
        ]
        params = []
        for p in own:
            params += derived if p.name == "opts" else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

        @functools.wraps(func)
        def command(**kw):
            return func(opts={f.name: kw.pop(f.name) for _, f in fields}, **kw)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _help(f) -> str:
    """Help text: the option's own, backticks (README markup) dropped."""
    return f.metadata["opt"].help.replace("`", "") + "."
