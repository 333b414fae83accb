"""Which kernel code runs: the module compiled at install time (aot_build.py) when it imports, else numba's JIT.

`native.NAME(...)` calls exports.py's kernel NAME. The choice is made once per process, at the
first call: the compiled spinctl_kernels._compiled when it imports, else the njit functions
themselves (compiled on first use, a few seconds, then cached by numba). A missing, broken or
stale compiled module (built from other kernel sources: exports.sources_digest) prints one
notice line on stderr and falls back; SPINCTL_KERNELS=jit picks the
JIT on purpose, without the notice (benchmarks, a kernel being edited).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading

import numpy as np

from .exports import EXPORTS, MODULE, sources_digest

ENV = "SPINCTL_KERNELS"  # "jit": skip the compiled module; unset (or anything else): use it when present

_lock = threading.Lock()
_chosen: dict[str, object] = {}  # "compiled": the compiled module, or None for the JIT; empty until the first call


def probe():
    """(compiled module or None, why not or None): what the next choice would be, printing nothing.

    The reason is None when the JIT was asked for (SPINCTL_KERNELS=jit) or the module is usable.
    """
    if os.environ.get(ENV) == "jit":
        return None, None
    try:
        module = importlib.import_module(f"{__package__}.{MODULE}")
    except Exception as e:  # never built (editable install, no C compiler), or built against another ABI
        return None, "not built" if isinstance(e, ModuleNotFoundError) else f"{type(e).__name__}: {e}".splitlines()[0]
    try:
        if module.sources_digest() != sources_digest():
            return None, "stale: the kernel sources changed since the build; rebuild with `make install`"
    except Exception as e:  # built by an older spinctl without the digest
        return None, f"no source digest ({type(e).__name__})"
    return module, None


def backend() -> str:
    """'compiled' or 'jit': the kernel code this process runs (choosing it if no kernel has run yet)."""
    with _lock:
        if "compiled" not in _chosen:
            module, why = probe()
            if why:
                print(
                    f"spinctl: compiled kernels unavailable ({why}); using numba JIT, which compiles on first use (seconds)",
                    file=sys.stderr,
                )
            _chosen["compiled"] = module
    return "jit" if _chosen["compiled"] is None else "compiled"


def reset() -> None:
    """Forget the choice, so that the next call chooses again (tests switching between the two)."""
    with _lock:
        _chosen.clear()
        for name in EXPORTS:
            globals().pop(name, None)


def _checked(name: str, fn, kinds):
    # An AOT function reads whatever memory it is handed: a wrong dtype or a strided view gives
    # wrong answers or a crash, not an exception. The wrappers always convert first; this keeps
    # them honest, on both paths alike.
    arrays = [(i, np.dtype(kind)) for i, kind in enumerate(kinds) if kind not in (int, bool)]

    def call(*args):
        if len(args) != len(kinds):
            raise TypeError(f"kernel {name} takes {len(kinds)} arguments, got {len(args)}")
        for i, dtype in arrays:
            a = args[i]
            if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == 1 and a.flags.c_contiguous):
                raise TypeError(f"kernel {name}: argument {i} must be a 1-D C-contiguous {dtype} array")
        return fn(*args)

    call.__name__ = name
    return call


def __getattr__(name: str):
    # Module attribute lookup of a kernel not yet bound: bind it, then later lookups find it directly.
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, function, kinds = EXPORTS[name]
    backend()  # chooses on the first call
    compiled = _chosen["compiled"]
    if compiled is not None:
        fn = getattr(compiled, name)
    else:
        fn = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    call = _checked(name, fn, kinds)
    globals()[name] = call
    return call
