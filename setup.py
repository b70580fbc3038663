"""Build the Cython accelerators; all metadata lives in pyproject.toml.

Each compiled module lives inside the package next to its pure-Python twin
(``_fast/scheduler.pyx`` -> ``sender._scheduler_c``, twin of
``sender/_scheduler_py.py``; ``_fast/syncer.pyx`` -> ``sender._syncer_c``; ``_fast/wire.pyx`` ->
``sender._wire_c``), so both regular and editable installs
(``pip install -e .`` builds it in place under ``sender/``) import it the same way.

``SENDER_NO_EXTENSIONS=1`` builds a pure-Python package for machines without
a C compiler. Otherwise a compiler error fails the build: falling back
silently would hide a slow install (tests/test_build.py checks it too).
"""

import os
import sys

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("SENDER_NO_EXTENSIONS") == "1"

# The twins must do identical IEEE arithmetic: forbid fusing a*b+c into one
# FMA instruction (gcc does so by default on arm64), which rounds differently.
CFLAGS = [] if sys.platform == "win32" else ["-ffp-contract=off"]

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,  # indices come from the heap's own bookkeeping
    "wraparound": False,  # no negative indices anywhere
    "cdivision": True,  # the only division is by a rate checked > 0
    "embedsignature": True,
}


def extensions() -> list:
    if NO_EXTENSIONS:
        print("sender: SENDER_NO_EXTENSIONS=1, building without C extensions")
        return []
    from Cython.Build import cythonize

    exts = [
        Extension(
            f"sender._{name}_c",
            [f"_fast/{name}.pyx"],
            depends=[f"_fast/{name}.pyx"],  # cythonize swaps sources for the .c; keep the .pyx in sdists
            extra_compile_args=CFLAGS,
        )
        for name in ("scheduler", "syncer", "wire")
    ]
    return cythonize(exts, compiler_directives=DIRECTIVES)


setup(ext_modules=extensions())
