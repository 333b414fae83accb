"""Builds the ahead-of-time compiled kernels (spinctl_kernels._compiled); everything else is in pyproject.toml.

The extension has no C sources of its own: build_ext hands it to kernels/aot_build.py, which
compiles the numba kernels with numba.pycc straight to the path setuptools expects (in place for
an editable install). pyproject's [build-system] requires numba and numpy for this step.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = Path(__file__).resolve().parent / "kernels"


def kernels_package():
    # The source tree's kernels/ under its installed name: aot_build's relative imports need
    # the package, and an older spinctl_kernels installed in the build environment must not answer.
    spec = importlib.util.spec_from_file_location(
        "spinctl_kernels", KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["spinctl_kernels"] = module
    spec.loader.exec_module(module)
    return module


class build_numba_ext(build_ext):
    def build_extension(self, ext):
        if ext.name != "spinctl_kernels._compiled":
            return super().build_extension(ext)
        path = Path(self.get_ext_fullpath(ext.name))
        path.parent.mkdir(parents=True, exist_ok=True)
        kernels_package()
        from spinctl_kernels.aot_build import compile_module

        compile_module(str(path.parent), path.name)


setup(
    ext_modules=[Extension("spinctl_kernels._compiled", sources=[])],
    cmdclass={"build_ext": build_numba_ext},
)
