"""The suite's non-throughput reports: thread scaling, cold start, peak memory, GEMM peak.

Cold start and memory are measured in fresh Python processes (``sys.executable``),
because both depend on what a process has already imported, compiled or touched.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import fastmask as fm

from .isolation import python_child


def _python(code: str, timeout: float = 300) -> str:
    argv, env = python_child(code)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-2000:]}")
    return out.stdout


# --------------------------------------------------------------------- thread scaling


def _routes() -> list[str | None]:
    """None (the router's choice), then each available backend other than the reference."""
    table = fm.plugins.backends()
    return [None, *(n for n, b in table.items() if n != "numpy" and b.status()[0])]


def _threaded_copy(out: np.ndarray, x: np.ndarray, n: int):
    """``np.copyto`` of ``n`` slices in ``n`` threads (NumPy releases the GIL): the
    memory-bandwidth floor for ``n`` threads."""
    if n == 1:
        return lambda: np.copyto(out, x)
    parts = np.array_split(np.arange(x.shape[0] * x.shape[1]), n)
    xs, os_ = x.reshape(-1, *x.shape[2:]), out.reshape(-1, *x.shape[2:])
    pairs = [(os_[p[0] : p[-1] + 1], xs[p[0] : p[-1] + 1]) for p in parts]
    pool = ThreadPoolExecutor(n)

    def copy():
        for f in [pool.submit(np.copyto, o, i) for o, i in pairs]:
            f.result()

    return copy


def thread_scaling(x, kwargs, threads: int, timer, repeats: int):
    """Seconds per call with 1 thread and with ``threads``: a copy of the input (the
    bandwidth floor), then each route, called as users call it (a fresh output)."""
    out = np.empty_like(x)
    rows = [("copy (np.copyto)", {n: timer(_threaded_copy(out, x, n), repeats)
                                  for n in sorted({1, threads})})]  # fmt: skip
    old = fm.threads.num_threads_setting()  # None: the default (restored as such)
    try:
        for backend in _routes():
            label = f"fastmask[{backend}]" if backend else "fastmask (auto)"
            times = {}
            for n in sorted({1, threads}):
                fm.set_num_threads(n)
                times[n] = timer(
                    lambda b=backend: fm.masked_softmax(x, **kwargs, backend=b), repeats
                )
            rows.append((label, times))
    finally:
        fm.set_num_threads(old)
    return rows


# --------------------------------------------------------------------- cold start

_IMPORT = """
import time, sys
t = time.perf_counter()
import fastmask
dt = time.perf_counter() - t
print(dt, int("numba" in sys.modules))
"""

_FIRST_CALL = """
import json, time
t0 = time.perf_counter()
import numpy as np
import fastmask as fm
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((1, 12, 64, 64), dtype=np.float32)
mask = fm.masks.padding([40])
t2 = time.perf_counter()
fm.masked_softmax(x, mask, backend={backend!r})
t3 = time.perf_counter()
decision = fm.explain(x, mask, backend={backend!r}).chosen
print(json.dumps({{"import": t1 - t0, "first": t3 - t2, "backend": decision}}))
"""


def cold_start(runs: int = 5) -> dict:
    """Import time, and the first call's time in a new process once caches are warm."""
    report = {}
    wall, inner = [], []
    numba_imported = False
    for _ in range(runs):
        t = time.perf_counter()
        dt, numba = _python(_IMPORT).split()
        wall.append(time.perf_counter() - t)
        inner.append(float(dt))
        numba_imported |= bool(int(numba))
    report["process"] = statistics.median(wall)
    report["import"] = statistics.median(inner)
    report["numba_imported"] = numba_imported
    for backend in _routes():
        _python(_FIRST_CALL.format(backend=backend))  # warms the kernel cache
        first = [json.loads(_python(_FIRST_CALL.format(backend=backend))) for _ in range(3)]
        report[f"first call {backend or 'auto'}"] = statistics.median(f["first"] for f in first)
        report[f"first call {backend or 'auto'} backend"] = first[0]["backend"]
    return report


# --------------------------------------------------------------------- peak memory

_MEMORY = """
import json, resource
import numpy as np
import fastmask as fm

def status(field):  # this process's own counters (ru_maxrss would include the parent's
    with open("/proc/self/status") as f:  # pages shared at fork)
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

small = np.zeros((1, 1, 8, 8), np.float32)
fm.masked_softmax(small, fm.masks.causal(), backend={backend!r})  # kernels loaded
x = np.random.default_rng(0).standard_normal((1, 16, 2048, 2048), dtype=np.float32)
before = status("VmRSS")
y = fm.masked_softmax(x, fm.masks.causal(), backend={backend!r})
print(json.dumps({{"before": before, "peak": status("VmHWM"), "input": x.nbytes,
                   "output": y.nbytes}}))
"""


def peak_memory() -> dict:
    """W2's peak resident memory in a fresh process, per compiled backend.

    ``before`` is the resident size with the input in memory; the call's own cost
    is ``peak - before``, which has to hold the output (the input is counted in
    ``before``).
    """
    report = {}
    for backend in _routes():
        report[backend or "auto"] = json.loads(_python(_MEMORY.format(backend=backend)))
    return report


# --------------------------------------------------------------------- GEMM peak


def gemm_peak(threads: int, n: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """The machine's float32 matrix-product speed: the roofline for attention's GFLOP/s.

    The best of ``repeats`` ``(n, n) @ (n, n)`` products into a preallocated output,
    through torch at ``threads`` threads, or through NumPy's BLAS where torch is missing.
    Returns ``(GFLOP/s, note)``.
    """
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    out = np.empty((n, n), np.float32)
    try:
        import torch
    except ImportError:
        torch = None
    limits = contextlib.nullcontext()
    if torch is not None:
        torch.set_num_threads(threads)
        ta, tb, tout = (torch.from_numpy(x) for x in (a, b, out))
        fn, how = (lambda: torch.matmul(ta, tb, out=tout)), f"torch.matmul, {threads} thread(s)"
    else:
        fn, how = (lambda: np.matmul(a, b, out=out)), "NumPy matmul, its BLAS's own threads"
        with contextlib.suppress(ImportError):  # NumPy's BLAS threads, for this measurement
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(threads, user_api="blas")  # restored on exit
            how = f"NumPy matmul, {threads} BLAS thread(s)"
    with limits:
        fn()  # warm-up: thread pool start, page faults
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9, f"float32 ({n}x{n}) @ ({n}x{n}), {how}"
