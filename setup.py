"""Build the C extension ``fastmask._kernels`` (Cython, OpenMP where the compiler has it).

Project metadata lives in pyproject.toml; this file only describes the extension.

Environment switches (any of 1/true/yes/on):

``FASTMASK_DISABLE_OPENMP``
    Build serially even when the compiler supports OpenMP.
``FASTMASK_BOUNDSCHECK``
    Debug build for the test suite: Cython boundscheck/wraparound on, C asserts on
    (``NDEBUG`` undefined, ``FASTMASK_DEBUG`` range checks in the row kernel).
``FASTMASK_DISABLE_MULTIVERSION``
    Compile only the baseline-ISA kernel (no AVX2 / AVX-512 variants).

The build probes the compiler it will use (setuptools' compiler object, in a temporary
directory): OpenMP by compiling and linking a tiny OpenMP program with ``-fopenmp``
(``/openmp`` on MSVC), and x86 function multiversioning by compiling the kernel header
with its target attributes. A failed probe gives a serial (or baseline-only) build and
a warning, never a failed install. Changing a switch rebuilds the extension.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PYX = "fastmask/_kernels.pyx"
HEADER = "fastmask/_softmax_row.h"
ENGINE = [
    "fastmask/_attention_engine.h",
    "fastmask/_attention_tile.h",
    "fastmask/_attention_decode.h",
    "fastmask/_attention.pxi",
]
DEBUG_SRC_DIR = "build/fastmask-debug-src"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


DISABLE_OPENMP = _env_flag("FASTMASK_DISABLE_OPENMP")
DEBUG = _env_flag("FASTMASK_BOUNDSCHECK")
DISABLE_MULTIVERSION = _env_flag("FASTMASK_DISABLE_MULTIVERSION")

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel num_threads(2) reduction(+:n)
    n += 1;
    return (n >= 1 && omp_get_max_threads() >= 1) ? 0 : 1;
}
"""

# Compiles the real kernel header (at -O0: only the attributes and builtins matter).
MULTIVERSION_PROBE = r"""
#include "_softmax_row.h"
#if !FM_X86_MV
#error "no x86 multiversioning with this compiler/target"
#endif
int main(void) { return fm_isa_select(-1) < 0; }
"""


def _warn(msg: str) -> None:
    print(f"WARNING (fastmask build): {msg}", file=sys.stderr)


def _info(msg: str) -> None:
    print(f"fastmask build: {msg}", file=sys.stderr)


@contextlib.contextmanager
def _silenced():
    """Silence the compiler's own output (fd level) while probing."""
    saved = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass
    try:
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _try_build(
    compiler, code: str, compile_args=(), link_args=(), macros=(), include_dirs=(), link=True
) -> bool:
    """Whether `code` compiles (and links into an executable) with these flags."""
    include_dirs = [os.path.abspath(d) for d in include_dirs]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fastmask-probe-") as tmp:
        try:
            os.chdir(tmp)
            with open("probe.c", "w") as f:
                f.write(code)
            with _silenced():
                objects = compiler.compile(
                    ["probe.c"],
                    extra_postargs=list(compile_args),
                    macros=list(macros),
                    include_dirs=include_dirs,
                )
                if link:
                    compiler.link_executable(objects, "probe", extra_postargs=list(link_args))
        except Exception:  # CompileError, LinkError, or a missing compiler
            return False
        finally:
            os.chdir(cwd)
    return True


def _configure(compiler) -> dict:
    """Compile/link flags and macros for this compiler, from probes."""
    msvc = compiler.compiler_type == "msvc"
    cfg = {"compile": [], "link": [], "macros": [], "openmp": False, "multiversion": False}
    if msvc:
        # /fp:precise is MSVC's default: keep IEEE -inf/NaN semantics (no /fp:fast).
        cfg["compile"] += ["/O2"]
        omp_compile, omp_link = ["/openmp"], []
        if DEBUG:
            cfg["compile"] += ["/UNDEBUG"]
    else:
        # -O3 but not -ffast-math: the kernels rely on -inf, NaN and exp(-inf) == 0.
        # -fno-trapping-math only drops FP-exception-flag guarantees; it lets gcc
        # if-convert the masked selects so those loops vectorise. No -march: the
        # baseline stays portable; AVX2/AVX-512 come from the multiversioned kernel.
        base = ["-O2", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
        for flag in ("-fno-trapping-math", "-Wno-unused-function"):
            if _try_build(compiler, "int main(void) { return 0; }\n", [flag], link=False):
                base.append(flag)
        cfg["compile"] += base
        omp_compile, omp_link = ["-fopenmp"], ["-fopenmp"]

    if DISABLE_OPENMP:
        _warn("FASTMASK_DISABLE_OPENMP is set: building without OpenMP (serial kernels).")
    elif _try_build(compiler, OPENMP_PROBE, omp_compile, omp_link):
        cfg["openmp"] = True
        cfg["compile"] += omp_compile
        cfg["link"] += omp_link
        _info(f"OpenMP enabled ({' '.join(omp_compile)}).")
    else:
        _warn(
            f"the compiler could not build an OpenMP program with {' '.join(omp_compile)}; "
            "building without OpenMP: fastmask's Cython kernels will run on one thread."
        )

    if DISABLE_MULTIVERSION:
        _info("FASTMASK_DISABLE_MULTIVERSION is set: baseline-ISA kernel only.")
    elif not msvc and _try_build(
        compiler,
        MULTIVERSION_PROBE,
        ["-O0"],
        macros=[("FASTMASK_MULTIVERSION", "1")],
        include_dirs=["fastmask"],
    ):
        cfg["multiversion"] = True
        cfg["macros"].append(("FASTMASK_MULTIVERSION", "1"))
        _info("x86 multiversioned kernels (baseline, AVX2+FMA, AVX-512).")
    else:
        _info("no x86 function multiversioning here: baseline-ISA kernel only.")

    if DEBUG:
        cfg["macros"].append(("FASTMASK_DEBUG", "1"))
    return cfg


class BuildExt(build_ext):
    """build_ext that probes the compiler and rebuilds when the configuration changes."""

    def build_extensions(self):
        cfg = _configure(self.compiler)
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + cfg["compile"]
            ext.extra_link_args = list(ext.extra_link_args or []) + cfg["link"]
            ext.define_macros = list(ext.define_macros or []) + cfg["macros"]
        # setuptools skips an extension whose sources are older than its .so, even when
        # flags (OpenMP, debug) changed: keep a stamp of the configuration.
        stamp_text = repr(sorted((k, str(v)) for k, v in cfg.items())) + repr(DEBUG)
        os.makedirs(self.build_temp, exist_ok=True)
        stamp = Path(self.build_temp) / "fastmask-build-config.txt"
        if not stamp.exists() or stamp.read_text() != stamp_text:
            self.force = True
        super().build_extensions()
        stamp.write_text(stamp_text)


def _kernel_source() -> str:
    """The .pyx to compile: the real one, or for the debug build a copy whose directive
    header turns the checks on (Cython lets a file's `# cython:` comments override
    directives passed to cythonize, so they must be changed in the file itself)."""
    if not DEBUG:
        return PYX
    lines = Path(PYX).read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("# cython:"):
            for name in ("boundscheck", "wraparound", "initializedcheck"):
                line = line.replace(f"{name}=False", f"{name}=True")
            lines[i] = line
    new = "".join(lines)
    if "boundscheck=True" not in new or "wraparound=True" not in new:
        raise RuntimeError(f"{PYX}: no '# cython: boundscheck=False, wraparound=False' header")
    out = Path(DEBUG_SRC_DIR) / PYX
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != new:
        out.write_text(new)
    return out.as_posix()


def _extensions():
    ext = Extension(
        "fastmask._kernels",
        sources=[_kernel_source()],
        depends=[HEADER, *ENGINE],
        include_dirs=[numpy.get_include(), "fastmask"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    directives = {"language_level": 3}
    if DEBUG:
        directives.update(boundscheck=True, wraparound=True, initializedcheck=True)
    # include_path: the debug build compiles a copy of the .pyx that includes the real .pxi
    return cythonize([ext], compiler_directives=directives, quiet=True, include_path=["fastmask"])


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
