"""The ``fastmask`` command: ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

from . import __version__, plugins
from .threads import available_cpus, get_num_threads


def _info() -> int:
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    print(f"fastmask {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"numpy {np.__version__}, numba {version('numba')}, pluggy {version('pluggy')}")
    print(f"threads: {get_num_threads()} (CPUs available to this process: {available_cpus()})")
    print("backends:")
    for name, backend in plugins.backends().items():
        ok, note = backend.status()
        state = "available" if ok else "UNAVAILABLE"
        extra = f" — {note}" if note else ""
        print(f"  {name:<8} {backend.device:<5} {state}{extra}")
        if backend.description:
            print(f"  {'':<8} {'':<5} {backend.description}")
    from . import openblas_spin
    from .threads import openmp_spin_setting

    print(f"OpenMP spin after a region: {openmp_spin_setting() or 'extension not loaded'}")
    for path, done in openblas_spin.setting().items():
        print(f"OpenBLAS {os.path.basename(path)}: {done}")
    print("plugins:")
    for info in plugins.list_plugins():
        kind = "built-in" if info.builtin else "external"
        adds = ", ".join(
            [f"backend {b}" for b in info.backends]
            + [f"mask strategy {s}" for s in info.mask_strategies]
        )
        print(f"  {info.name} ({kind}){': ' + adds if adds else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastmask`` console script."""
    parser = argparse.ArgumentParser(
        prog="fastmask", description="Fast, correct masked softmax for attention on CPUs."
    )
    parser.add_argument("--version", action="version", version=f"fastmask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backends, threads, plugins")
    sub.add_parser("demo", help="a small worked example with padding and causal masks")
    bench = sub.add_parser("bench", help="run the benchmark suite")
    bench.add_argument(
        "--quick", action="store_true",
        help="fewer repeats and only the headline workloads (under a minute)",
    )  # fmt: skip
    bench.add_argument(
        "--workload", action="append",
        help="run only this workload (repeatable): W1 W1-dense W2 W3 W4 W5-f16 W5-f64 W6 "
        "tiny A1 A2 A3 A4 scaling startup memory pipeline hf",
    )  # fmt: skip
    bench.add_argument("--threads", type=int, help="thread count for fastmask and peers")
    bench.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="also draw a bar chart (needs matplotlib)"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument(
        "--check", action="store_true",
        help="exit with status 1 when a performance target this run decides is missed",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info()
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
        from .bench import run_cli

        return run_cli(args)
    except BrokenPipeError:  # e.g. `fastmask info | head`: the reader has gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
