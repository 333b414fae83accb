"""Builds the ahead-of-time compiled kernels (spinctl_kernels._compiled); everything else is in pyproject.toml.

The extension has no C sources of its own: build_ext hands it to kernels/aot_build.py, which
compiles the numba kernels with numba.pycc straight to the path setuptools expects (in place for
an editable install). pyproject's [build-system] requires numba and numpy for this step.
If compiling fails (no C compiler, a numba without pycc) the install still succeeds without the
extension: spinctl then says so once per run and uses numba's JIT (kernels/native.py).
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = Path(__file__).resolve().parent / "kernels"
NAME = "spinctl_kernels._compiled"  # kernels/exports.py: MODULE


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
    def build_extensions(self):
        super().build_extensions()
        # A failed compile leaves no file: drop the extension so the install does not try to copy it.
        self.extensions = [e for e in self.extensions if e.name != NAME or Path(self.get_ext_fullpath(NAME)).exists()]

    def build_extension(self, ext):
        if ext.name != NAME:
            return super().build_extension(ext)
        path = Path(self.get_ext_fullpath(ext.name))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            kernels_package()
            from spinctl_kernels.aot_build import compile_module

            compile_module(str(path.parent), path.name)
        except Exception as e:
            # Shown by pip only with -v; the installed spinctl reports the missing module itself.
            print(
                f"spinctl: kernels not compiled ahead of time ({type(e).__name__}: {e}); numba's JIT will compile them on first use",
                file=sys.stderr,
            )


setup(
    ext_modules=[Extension(NAME, sources=[])],
    cmdclass={"build_ext": build_numba_ext},
)
