"""Compiles the kernels listed in exports.py ahead of time into the extension spinctl_kernels._compiled (numba.pycc).

Called by setup.py's build_ext at build/install time; never at run time. The kernel bodies stay
the njit functions of topk.py, sets.py and ranges.py: pycc compiles their `.py_func`, and the
njit helpers they call are compiled into the same module.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import numpy as np

from .exports import EXPORTS, MODULE, sources_digest

# Generic code for the target architecture by default: a wheel may be copied to an older CPU,
# where host-specific instructions would crash with SIGILL at the first call, past any fallback.
# A pipeline that builds and runs on the same machine can set SPINCTL_AOT_CPU=host.
CPU_ENV = "SPINCTL_AOT_CPU"


def numba_args(kinds) -> tuple:
    """Numba argument types for exports.py's kinds: dtype -> 1-D C-contiguous array, int -> int64, bool -> boolean."""
    from numba import types
    from numba.np.numpy_support import from_dtype

    out = []
    for kind in kinds:
        if kind is int:
            out.append(types.int64)
        elif kind is bool:
            out.append(types.boolean)
        else:
            out.append(types.Array(from_dtype(np.dtype(kind)), 1, "C"))
    return tuple(out)


def compile_module(output_dir: str, output_file: str | None = None) -> str:
    """Build the extension into output_dir (file name: output_file, else the platform's); returns its path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba.pycc's pending-deprecation warning: the build log is not the place
        from numba.pycc import CC

    cc = CC(MODULE, source_module=sys.modules[__name__])
    cc.output_dir = output_dir
    if output_file:
        cc.output_file = output_file
    cc.target_cpu = os.environ.get(CPU_ENV, "")
    for name, (module, function, kinds) in EXPORTS.items():
        dispatcher = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        # Argument types only: the return type is inferred exactly as the JIT infers it.
        cc.export(name, numba_args(kinds))(dispatcher.py_func)
    digest = sources_digest()
    cc.export("sources_digest", ())(lambda: digest)  # the digest, frozen into the binary as a constant
    cc.compile()
    return os.path.join(output_dir, cc.output_file)
