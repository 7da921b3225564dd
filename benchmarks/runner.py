"""Timing, the results table, and ``fastmask bench``."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

import fastmask as fm

from . import hf_models, peers, pipeline, reports, targets
from .isolation import PeerProcess, is_peer
from .workloads import WORKLOADS, Workload


@dataclass
class Result:
    workload: str
    impl: str
    seconds: float | None  # median per call (throughput workloads)
    note: str = ""
    value: float | None = None  # the other reports' measurements, in ``unit``
    unit: str = ""
    flops: float | None = None  # attention: FLOPs of the kept scores (the GFLOP/s column)


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


# ----------------------------------------------------------- what each workload times


def _softmax_impls(inp, threads: int):
    yield "copy (np.copyto)", lambda: peers.make_copy(inp, threads)
    for backend, b in fm.plugins.backends().items():
        if backend == "numpy":
            continue
        ok, why = b.status()
        if not ok:
            yield f"fastmask[{backend}]", lambda why=why: (None, why)
            continue
        yield (
            f"fastmask[{backend}] out=",
            lambda b=backend: peers.make_fastmask(inp, threads, b, True),
        )
        yield f"fastmask[{backend}]", lambda b=backend: peers.make_fastmask(inp, threads, b, False)
    yield "fastmask (auto)", lambda: peers.make_fastmask(inp, threads, None, False)
    yield "numpy reference", lambda: peers.make_numpy_reference(inp, threads)
    yield "torch masked_fill+softmax", lambda: peers.make_torch_masked_fill(inp, threads)
    yield "torch _masked_softmax", lambda: peers.make_torch_masked_softmax(inp, threads)
    yield "onnxruntime add+softmax", lambda: peers.make_onnxruntime(inp, threads)


def _attention_impls(inp, threads: int):
    yield "copy (np.copyto q,k,v)", lambda: peers.make_attention_copy(inp, threads)
    yield "read kept K/V once", lambda: peers.make_kv_read_floor(inp, threads)  # decode floor
    # The default route first: the tiled driver of a backend timed before it would leave
    # NumPy's BLAS threads spinning into its timings (the in-pipeline benchmark measures
    # that interplay on purpose).
    yield "fastmask (auto)", lambda: peers.make_fastmask_attention(inp, threads, None)
    for backend, b in fm.plugins.backends().items():
        if backend == "numpy":
            continue
        ok, why = b.status()
        if not ok or "attention" not in b.ops:
            why = why or "does not implement attention"
            yield f"fastmask[{backend}]", lambda why=why: (None, why)
            continue
        yield (
            f"fastmask[{backend}]",
            lambda b=backend: peers.make_fastmask_attention(inp, threads, b),
        )
    yield "numpy reference", lambda: peers.make_numpy_attention(inp, threads)
    yield "torch sdpa", lambda: peers.make_torch_sdpa(inp, threads)
    yield "torch flex_attention", lambda: peers.make_torch_flex(inp, threads)
    yield "onnxruntime attention", lambda: peers.make_onnxruntime_attention(inp, threads)
    yield "onnxruntime contrib MHA/GQA", lambda: peers.make_onnxruntime_contrib(inp, threads)
    yield "openvino sdpa", lambda: peers.make_openvino_sdpa(inp, threads)
    yield "tf tutorial (compat.tf)", lambda: peers.make_tf_compat(inp, threads)
    yield "tf tutorial (numpy)", lambda: peers.make_tf_numpy(inp, threads)


#: Rows that are yardsticks (memory floors), not implementations: no ratio, no GFLOP/s.
YARDSTICKS = ("copy", "read kept K/V once")

#: Implementations that only need a few samples (slow yardsticks), per op.
_FEW_SAMPLES = {
    "masked_softmax": ("numpy", "torch", "onnx"),
    "attention": ("numpy", "tf tutorial"),
}


def _time_impls(w: Workload, threads: int, quick: bool, want, progress) -> list[Result]:
    inp = w.make(np.random.default_rng(0))
    impls = _attention_impls if w.op == "attention" else _softmax_impls
    repeats = w.quick_repeats if quick else w.repeats
    few = _FEW_SAMPLES.get(w.op, ())
    flops = inp.attention_flops() if w.op == "attention" else None  # once per workload
    results = []
    for name, make in impls(inp, threads):
        if not want(name):
            continue
        fn, note = make()
        if fn is None:
            results.append(Result(w.name, name, None, note))
        else:
            slow = name.startswith(few)
            seconds = time_call(fn, max(2, repeats // 5) if slow else repeats, 1 if slow else 2)
            work = None if name.startswith(YARDSTICKS) else flops
            results.append(Result(w.name, name, seconds, note, flops=work))
        progress(results[-1])
    return results


#: The pseudo-workload of the GEMM peak: measured once per run that has attention workloads.
GEMM = "GEMM"


def _gemm(threads: int) -> Result:
    gflops, note = reports.gemm_peak(threads)
    return Result(GEMM, "GEMM peak", None, note, gflops, "GFLOP/s")


def time_workload_peers(name: str, threads: int, quick: bool) -> list[Result]:
    """The peers of one workload (run in the peer process, see ``isolation``); or the
    GEMM peak (``GEMM``), measured there because torch lives there."""
    if name == GEMM:
        return [_gemm(threads)]
    fm.set_num_threads(threads)
    return _time_impls(WORKLOADS[name], threads, quick, is_peer, lambda r: None)


# ----------------------------------------------------------- the other reports


def _scaling(threads: int, quick: bool, progress) -> list[Result]:
    inp = WORKLOADS["W1"].make(np.random.default_rng(0))
    repeats = 3 if quick else 10
    results = []
    for label, times in reports.thread_scaling(inp.x, inp.kwargs, threads, time_call, repeats):
        for n, s in times.items():
            results.append(Result("scaling", f"{label} {n} thread(s)", s))
            progress(results[-1])
        if len(times) == 2:
            speedup = times[1] / times[threads]
            results.append(Result("scaling", f"{label} speed-up", None, "", speedup, "x"))
    return results


def _startup(threads: int, quick: bool, progress) -> list[Result]:
    rep = reports.cold_start(runs=3 if quick else 5)
    results = [
        Result("startup", "python -c 'import fastmask' (process)", None, "", rep["process"], "s"),
        Result("startup", "import fastmask", None,
               "imports numba" if rep["numba_imported"] else "numba not imported",
               rep["import"], "s"),
    ]  # fmt: skip
    for key, value in rep.items():
        if key.startswith("first call") and not key.endswith("backend"):
            backend = key.split()[-1]
            label = f"first call in a new process ({backend})"
            note = f"routed to {rep[key + ' backend']}, kernel cache warm"
            results.append(Result("startup", label, None, note, value, "s"))
    for r in results:
        progress(r)
    return results


def _memory(threads: int, quick: bool, progress) -> list[Result]:
    results = []
    for backend, m in reports.peak_memory().items():
        baseline = m["before"] - m["input"]
        used = m["peak"] - baseline
        results += [
            Result("memory", f"{backend} peak RSS", None, "", m["peak"], "B"),
            Result("memory", f"{backend} input + output", None, "", m["input"] + m["output"], "B"),
            Result("memory", f"{backend} peak - baseline - (input + output)", None,
                   f"baseline (process before the input) {baseline / 2**20:.0f} MB",
                   used - m["input"] - m["output"], "B"),
        ]  # fmt: skip
        progress(results[-1])
    return results


_REPORTS = {"scaling": _scaling, "startup": _startup, "memory": _memory,
            "pipeline": pipeline.report, "hf": hf_models.report}  # fmt: skip


def check_targets(results: list[Result]) -> list[targets.Target]:
    """Every target this run's results can decide: the suite's and the pipeline's."""
    return targets.check(results) + pipeline.check(results) + hf_models.check(results)


# ----------------------------------------------------------- the suite


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr when tqdm is installed (the bench extra), else nothing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="timing", file=sys.stderr, leave=False, dynamic_ncols=True)


def _steps(name: str) -> int:
    w = WORKLOADS[name]
    if w.op in _REPORTS:
        return 1
    impls = _attention_impls if w.op == "attention" else _softmax_impls
    return sum(1 for _ in impls(None, 1))


def run_suite(names=None, threads: int | None = None, quick: bool = False, log=print,
              isolate: bool = True, progress: bool = False) -> list[Result]:  # fmt: skip
    """Run workloads and return their results.

    Parameters
    ----------
    names : list of str, optional
        Workload names (``WORKLOADS``); all of them by default.
    threads : int, optional
        Threads for fastmask and for the peers (default: fastmask's setting).
    quick : bool
        Fewer repeats.
    log : callable or None
        Receives one line per timing (None: quiet).
    isolate : bool
        Time the peers (PyTorch, ONNX Runtime) in a separate process.
    progress : bool
        Show a progress bar (tqdm) on stderr.
    """
    names = list(names or WORKLOADS)
    for name in names:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    threads = threads or fm.get_num_threads()
    gemm = any(WORKLOADS[n].op == "attention" for n in names)  # one step more when measured
    bar = _progress_bar(sum(_steps(n) for n in names) + gemm, progress)
    write = bar.write if bar is not None else (log or (lambda line: None))

    def logged(r: Result) -> None:
        if r.seconds is not None:
            write(f"  {r.workload:<9} {r.impl:<34} {r.seconds * 1e3:10.4f} ms")
        elif r.workload == GEMM:
            write(f"  {_gemm_line(r)}")

    def done(r: Result) -> None:  # one step of the bar per timing
        logged(r)
        if bar is not None:
            bar.update(1)

    old = fm.threads.num_threads_setting()  # None: the default (restored as such)
    fm.set_num_threads(threads)
    results: list[Result] = []
    try:
        with PeerProcess() if isolate else contextlib.nullcontext() as child:
            for name in names:
                w = WORKLOADS[name]
                if w.op in _REPORTS:
                    results += _REPORTS[w.op](threads, quick, logged)
                    if bar is not None:  # a report is one step of the bar
                        bar.update(1)
                    continue
                if w.op == "attention" and gemm:  # the roofline, before the first attention
                    gemm = False
                    results += (
                        child.time_peers(GEMM, threads, quick) if isolate else [_gemm(threads)]
                    )
                    done(results[-1])
                want = (lambda n: not is_peer(n)) if isolate else (lambda n: True)
                mine = _time_impls(w, threads, quick, want, done)
                if isolate:
                    theirs = child.time_peers(name, threads, quick)
                    for r in theirs:
                        done(r)
                    mine = _merge(w, mine, theirs)
                results += mine
    finally:
        fm.set_num_threads(old)
        if bar is not None:
            bar.close()
    return results


def _merge(w: Workload, mine: list[Result], theirs: list[Result]) -> list[Result]:
    """Both processes' results in the workload's own order."""
    impls = _attention_impls if w.op == "attention" else _softmax_impls
    order = {name: i for i, (name, _) in enumerate(impls(None, 1))}
    return sorted(mine + theirs, key=lambda r: order.get(r.impl, len(order)))


# ----------------------------------------------------------- the report


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.2f} us"


def _fmt_value(r: Result) -> str:
    if r.unit == "B":
        return f"{r.value / 2**20:.1f} MB"
    if r.unit == "s":
        return f"{r.value:.3f} s"
    return f"{r.value:.2f}{r.unit}"


def _gemm_line(r: Result) -> str:
    return f"GEMM peak: {r.value:.1f} GFLOP/s   ({r.note})"


def format_table(results: list[Result]) -> str:
    """The results as a plain-text table, one block per workload.

    Attention blocks add a GFLOP/s column: the kept scores' FLOPs (``Result.flops``)
    per second, next to the run's measured ``GEMM peak`` line.
    """
    lines = []
    for wname in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == wname]
        if wname == GEMM:
            lines += [_gemm_line(r) for r in rows] + [""]
            continue
        lines.append(f"{wname}: {WORKLOADS[wname].description}")
        if WORKLOADS[wname].op == "pipeline":
            lines += [*pipeline.format_rows(rows), ""]
            continue
        if WORKLOADS[wname].op == "hf":
            lines += [*hf_models.format_rows(rows), ""]
            continue
        if WORKLOADS[wname].op in _REPORTS:
            for r in rows:
                shown = _fmt_time(r.seconds) if r.seconds is not None else _fmt_value(r)
                lines.append(f"  {r.impl:<48} {shown:>12}   {r.note}".rstrip())
            lines.append("")
            continue
        copy = next((r.seconds for r in rows if r.impl.startswith("copy")), None)
        auto = next((r.seconds for r in rows if r.impl == "fastmask (auto)"), None)
        rate = any(r.flops for r in rows)  # attention: the GFLOP/s column
        lines.append(
            f"  {'implementation':<28} {'median':>12} {'x copy':>8} {'fastmask (auto) is':>20}"
            + (f" {'GFLOP/s':>9}" if rate else "")
        )
        for r in rows:
            if r.seconds is None:
                lines.append(f"  {r.impl:<28} {'skipped':>12}   {r.note}")
                continue
            ratio = f"{r.seconds / copy:.2f}" if copy else "-"
            faster = (
                _relative(r.seconds / auto)
                if auto and not r.impl.startswith(("fastmask", *YARDSTICKS))
                else ""
            )
            line = f"  {r.impl:<28} {_fmt_time(r.seconds):>12} {ratio:>8} {faster:>20}"
            if r.flops:
                line += f" {r.flops / r.seconds / 1e9:>9.1f}"
            lines.append(line)
        lines.append("")
    checked = check_targets(results)
    if checked:
        lines.append("targets:")
        lines += [t.line() for t in checked]
        lines.append("")
    return "\n".join(lines)


def _relative(ratio: float) -> str:
    """A peer's time over fastmask's, in words: "3.1x faster" or "2.0x slower"."""
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def output_problem(path: str | None, what: str) -> str | None:
    """Why ``path`` cannot be written once the run is over (checked before it starts)."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{what} {path!r}: the folder {folder!r} does not exist; create it first"
    if not os.access(folder, os.W_OK):
        return f"{what} {path!r}: the folder {folder!r} is not writable"
    return None


def machine() -> str:
    """A one-line description of this machine for the report."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    return f"{cpu}, {fm.threads.available_cpus()} CPU(s) available"


def run_cli(args) -> int:
    """``fastmask bench``: 0 when done (with ``--check``: and every target met), 1 when
    ``--check`` finds a missed target, 2 for arguments that cannot work."""
    problems = [output_problem(args.json, "--json"), output_problem(args.plot, "--plot")]
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        problems.append("--plot needs matplotlib: pip install matplotlib")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1; got {args.threads}")
    problems = [p for p in problems if p]
    if problems:
        for p in problems:
            print(f"fastmask bench: error: {p}", file=sys.stderr)
        return 2
    threads = args.threads or fm.get_num_threads()
    names = args.workload or (QUICK if args.quick else None)
    print(f"fastmask {fm.__version__} bench: {machine()}; {threads} thread(s), "
          f"numpy {np.__version__}")  # fmt: skip
    results = run_suite(names, threads, args.quick, progress=not args.no_progress)
    print()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine(), "threads": threads, "quick": args.quick,
                 "results": [asdict(r) for r in results],
                 "targets": [asdict(t) for t in check_targets(results)]},
                f, indent=1,
            )  # fmt: skip
        print(f"wrote {args.json}")
    if args.plot:
        from .plot import plot_results

        plot_results(results, args.plot, title=f"fastmask {fm.__version__}: {machine()}, "
                     f"{threads} thread(s)")  # fmt: skip
        print(f"wrote {args.plot}")
    if getattr(args, "check", False):
        missed = [t for t in check_targets(results) if not t.met]
        if missed:
            print(f"--check: {len(missed)} target(s) MISSED", file=sys.stderr)
            return 1
        print("--check: every target this run decides is met")
    return 0


#: ``fastmask bench --quick`` without ``--workload``: the headline workloads, < 1 minute.
QUICK = ["W1", "W3", "W4", "W6", "tiny", "scaling", "startup"]
