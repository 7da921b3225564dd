"""Timing, the results table, and ``fastmask bench``."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

import fastmask as fm

from . import peers
from .workloads import WORKLOADS, Workload


@dataclass
class Result:
    workload: str
    impl: str
    seconds: float | None  # median per call
    note: str = ""


def time_call(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call; tiny calls are timed in batches to beat timer resolution."""
    for _ in range(warmup):
        fn()
    rounds = min(repeats, 15)
    batch = max(1, repeats // rounds)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t0) / batch)
    return statistics.median(samples)


def _impls(w: Workload, inp, threads: int, quick: bool):
    """The implementations timed for a workload: its op's fastmask calls, then the peers."""
    if w.op == "attention":
        yield from _attention_impls(inp, threads, quick)
    else:
        yield from _softmax_impls(inp, threads, quick)


def _softmax_impls(inp, threads: int, quick: bool):
    yield "copy (np.copyto)", *peers.make_copy(inp, threads)
    for backend in fm.plugins.backends():
        if backend == "numpy":
            continue
        ok, why = fm.plugins.backends()[backend].status()
        if not ok:
            yield f"fastmask[{backend}]", None, why
            continue
        yield f"fastmask[{backend}] out=", *peers.make_fastmask(inp, threads, backend, True)
        yield f"fastmask[{backend}]", *peers.make_fastmask(inp, threads, backend, False)
    yield "fastmask (auto)", *peers.make_fastmask(inp, threads, None, False)
    yield "numpy reference", *peers.make_numpy_reference(inp, threads)
    yield "torch masked_fill+softmax", *peers.make_torch_masked_fill(inp, threads)
    yield "onnxruntime add+softmax", *peers.make_onnxruntime(inp, threads)


def _attention_impls(inp, threads: int, quick: bool):
    yield "copy (np.copyto q,k,v)", *peers.make_attention_copy(inp, threads)
    for backend in fm.plugins.backends():
        if backend == "numpy":
            continue
        b = fm.plugins.backends()[backend]
        ok, why = b.status()
        if not ok or "attention" not in b.ops:
            yield f"fastmask[{backend}]", None, why or "does not implement attention"
            continue
        yield f"fastmask[{backend}]", *peers.make_fastmask_attention(inp, threads, backend)
    yield "fastmask (auto)", *peers.make_fastmask_attention(inp, threads, None)
    yield "numpy reference", *peers.make_numpy_attention(inp, threads)
    yield "torch sdpa", *peers.make_torch_sdpa(inp, threads)
    yield "onnxruntime attention", *peers.make_onnxruntime_attention(inp, threads)
    yield "tf tutorial (compat.tf)", *peers.make_tf_compat(inp, threads)
    yield "tf tutorial (numpy)", *peers.make_tf_numpy(inp, threads)


#: Implementations that only need a few samples (slow yardsticks), per op.
_FEW_SAMPLES = {
    "masked_softmax": ("numpy", "torch", "onnx"),
    "attention": ("numpy", "tf tutorial"),
}


def run_workload(w: Workload, threads: int, quick: bool, log=print) -> list[Result]:
    rng = np.random.default_rng(0)
    inp = w.make(rng)
    repeats = w.quick_repeats if quick else w.repeats
    results = []
    few = _FEW_SAMPLES.get(w.op, ())
    for name, fn, note in _impls(w, inp, threads, quick):
        if fn is None:
            results.append(Result(w.name, name, None, note))
            continue
        # The slow yardsticks only need a few samples.
        r = repeats if not name.startswith(few) else max(2, repeats // 5)
        seconds = time_call(fn, r)
        log(f"  {w.name:<9} {name:<28} {seconds * 1e3:10.4f} ms")
        results.append(Result(w.name, name, seconds, note))
    return results


def format_table(results: list[Result]) -> str:
    lines = []
    for wname in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == wname]
        copy = next((r.seconds for r in rows if r.impl.startswith("copy")), None)
        fast = [r.seconds for r in rows if r.impl.startswith("fastmask") and r.seconds]
        best = min(fast) if fast else None
        lines.append(f"{wname}: {WORKLOADS[wname].description}")
        lines.append(
            f"  {'implementation':<28} {'median':>12} {'x copy':>8} {'best fastmask is':>18}"
        )
        for r in rows:
            if r.seconds is None:
                lines.append(f"  {r.impl:<28} {'skipped':>12}   {r.note}")
                continue
            t = f"{r.seconds * 1e3:.3f} ms" if r.seconds >= 1e-4 else f"{r.seconds * 1e6:.2f} us"
            ratio = f"{r.seconds / copy:.2f}" if copy else "-"
            faster = (
                f"{r.seconds / best:.1f}x faster"
                if best and not r.impl.startswith("fastmask")
                else ""
            )
            lines.append(f"  {r.impl:<28} {t:>12} {ratio:>8} {faster:>18}")
        lines.append("")
    return "\n".join(lines)


def run_suite(names=None, threads: int | None = None, quick: bool = False, log=print):
    threads = threads or fm.get_num_threads()
    old = fm.get_num_threads()
    fm.set_num_threads(threads)
    try:
        results = []
        for name in names or list(WORKLOADS):
            if name not in WORKLOADS:
                raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
            results += run_workload(WORKLOADS[name], threads, quick, log)
        return results
    finally:
        fm.set_num_threads(old)


def run_cli(args) -> int:
    threads = args.threads or fm.get_num_threads()
    print(f"fastmask {fm.__version__} bench: {platform.processor() or platform.machine()}, "
          f"{threads} thread(s), numpy {np.__version__}")  # fmt: skip
    results = run_suite(args.workload, threads, args.quick)
    print()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "results": [asdict(r) for r in results]}, f, indent=1)
        print(f"wrote {args.json}")
    return 0
