"""Builds the compiled core (fanout_core) with Cython; metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# Directives are set once here, not per file: the hot path is bounds-checked by
# construction (slots are validated on the Python-facing methods).
DIRECTIVES = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}

extensions = [
    Extension(
        "fanout_core._core",
        ["fanout_core/_core.pyx"],
        # -pthread: the parallel flush's worker pool (plain pthreads, no OpenMP).
        extra_compile_args=["-O3", "-pthread"],
        extra_link_args=["-pthread"],
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, annotate=False))
