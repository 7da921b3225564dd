"""Inference-server conditions: many Python threads at once, forked and spawned workers,
joblib workers (processes and threads), and the unsupported nested case (fastmask
inside a Numba ``prange``), which must fail cleanly at compile time."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import BACKENDS, assert_matches_reference, threaded_cases

import fastmask as fm
from fastmask import masks
from fastmask.threads import num_threads_setting

COMPILED = [b for b in BACKENDS if b != "numpy"]


def test_many_python_threads_at_once(backend):
    if backend == "numpy":
        pytest.skip("the reference backend runs no threads of its own")
    cases = threaded_cases()
    expected = [fm.masked_softmax(x, m, backend=backend) for x, m in cases]

    def worker(seed: int) -> int:
        bad = 0
        for call in range(200):
            k = (seed + call) % len(cases)
            x, m = cases[k]
            y = fm.masked_softmax(x, m, backend=backend)
            bad += not np.array_equal(y, expected[k], equal_nan=True)
        return bad

    with ThreadPoolExecutor(16) as pool:
        mismatches = sum(pool.map(worker, range(16)))
    assert mismatches == 0


def _attention_case():
    """Large enough that the fused attention engine runs a parallel region."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 4, 160, 64)).astype(np.float32) for _ in range(3))
    return q, k, v, masks.causal()


def _check_every_backend() -> None:
    for x, m in threaded_cases():
        keep = m.to_dense(x.shape) if isinstance(m, masks.MaskStrategy) else m
        for name in COMPILED:
            assert_matches_reference(fm.masked_softmax(x, m, backend=name), x, keep)
    q, k, v, m = _attention_case()
    expected = fm.attention(q, k, v, m, backend="numpy")
    for name in COMPILED:
        np.testing.assert_allclose(fm.attention(q, k, v, m, backend=name), expected, atol=1e-5)


def _child_work(queue) -> None:
    try:
        _check_every_backend()
        queue.put("ok")
    except BaseException as exc:  # report, don't hang the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def _use_every_backend() -> None:
    for x, m in threaded_cases():
        for name in COMPILED:
            fm.masked_softmax(x, m, backend=name)
    for name in COMPILED:
        fm.attention(*_attention_case(), backend=name)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_worker_processes_after_parallel_use(method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"start method {method!r} unavailable on {sys.platform}")
    for name in COMPILED:
        ok, why = fm.plugins.backends()[name].status()
        if not ok:
            pytest.skip(why)
    _use_every_backend()
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_work, args=(queue,))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"child started with {method!r} hung")
    assert proc.exitcode == 0
    assert queue.get(timeout=5) == "ok"


def test_os_fork_child_computes_correctly():
    _use_every_backend()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read)
            _check_every_backend()
            os.write(write, b"ok")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 120
    while True:  # a hang in the child fails the test instead of the suite
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung")
        time.sleep(0.05)
    message = os.read(read, 100)
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and message == b"ok"


def test_numba_threading_layer_is_fork_safe():
    pytest.importorskip("numba")
    import numba

    from fastmask.kernels import numba_softmax

    x = np.zeros((4, 64, 1024), np.float32)
    numba_softmax.masked_softmax_4d(x[None], np.empty_like(x)[None], 1.0, None, None, None, 0, 2)
    assert numba.threading_layer() == "workqueue"


def test_attention_from_many_python_threads(backend):
    if backend == "numpy":
        pytest.skip("the reference backend runs no threads of its own")
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 4, 64, 32)).astype(np.float32)
    k = rng.standard_normal((2, 2, 96, 32)).astype(np.float32)  # grouped-query heads
    v = rng.standard_normal((2, 2, 96, 16)).astype(np.float32)
    strategies = [masks.causal(align="bottom-right"), masks.padding([96, 40]), None]
    expected = [fm.attention(q, k, v, m, backend=backend) for m in strategies]

    def worker(seed: int) -> int:
        bad = 0
        for call in range(200):
            i = (seed + call) % len(strategies)
            out = fm.attention(q, k, v, strategies[i], backend=backend)
            bad += not np.allclose(out, expected[i], atol=1e-6, rtol=1e-5)
        return bad

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(worker, range(16))) == 0


def test_first_parallel_call_selects_the_fork_safe_layer():
    """A fresh process whose first numba call runs in parallel ends up on ``workqueue``.

    Regression: ``numba.set_num_threads()`` launched Numba's threads (on the default
    ``omp`` layer) before the kernels module, which selected the layer, had compiled.
    """
    pytest.importorskip("numba")
    script = (
        "import numpy as np, numba, fastmask as fm\n"
        "x = np.zeros((2, 4, 64, 1024), np.float32)\n"
        "fm.masked_softmax(x, backend='numba')\n"
        "print(numba.threading_layer())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env.update(FASTMASK_NUM_THREADS="2", NUMBA_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "workqueue"


# ------------------------------------------------------------------ joblib workers


def _attention_cases():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 64, 32)).astype(np.float32)
    k = rng.standard_normal((2, 2, 96, 32)).astype(np.float32)  # grouped-query heads
    v = rng.standard_normal((2, 2, 96, 16)).astype(np.float32)
    return [(q, k, v, m) for m in (masks.causal(align="bottom-right"), masks.padding([96, 40]))]


_CASES_IN_WORKER: dict = {}


def _joblib_task(op: str, i: int, backend: str):
    """One call, on inputs rebuilt in the worker from their seed (nothing big to ship)."""
    if op not in _CASES_IN_WORKER:
        _CASES_IN_WORKER[op] = threaded_cases() if op == "masked_softmax" else _attention_cases()
    case = _CASES_IN_WORKER[op][i]
    if op == "masked_softmax":
        x, m = case
        return fm.masked_softmax(x, m, backend=backend)
    q, k, v, m = case
    return fm.attention(q, k, v, m, backend=backend)


@pytest.mark.parametrize("joblib_backend", ["loky", "threading"])
def test_joblib_workers(joblib_backend):
    joblib = pytest.importorskip("joblib")
    names = [n for n in BACKENDS if fm.plugins.backends()[n].status()[0]]
    tasks = [("masked_softmax", i, n) for i in range(len(threaded_cases())) for n in names]
    tasks += [("attention", i, n) for i in range(len(_attention_cases())) for n in names]
    expected = [_joblib_task(*t) for t in tasks]  # single-threaded, in this process
    try:
        got = joblib.Parallel(n_jobs=2, backend=joblib_backend)(
            joblib.delayed(_joblib_task)(*t) for t in tasks * 2
        )
    finally:
        if joblib_backend == "loky":  # don't leave the worker processes behind
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor().shutdown(wait=True)
    for (op, _, name), y, e in zip(tasks * 2, got, expected * 2, strict=True):
        if op == "masked_softmax":  # summation order fixed: see test_numba_determinism
            assert np.array_equal(y, e, equal_nan=True), name
        else:  # BLAS products may round differently with another thread count
            np.testing.assert_allclose(y, e, atol=1e-6, rtol=1e-5, err_msg=name)


# ------------------------------------------------------------ nested parallelism


def test_calling_fastmask_inside_a_numba_prange_is_a_compile_error():
    """Not supported: nopython mode cannot call fastmask; Numba says so when it compiles."""
    numba = pytest.importorskip("numba")
    from numba.core.errors import TypingError

    from fastmask import masked_softmax

    def via_module(x):
        out = np.empty_like(x)
        for i in numba.prange(x.shape[0]):
            out[i] = fm.masked_softmax(x[i])
        return out

    def via_function(x):
        out = np.empty_like(x)
        for i in numba.prange(x.shape[0]):
            out[i] = masked_softmax(x[i])
        return out

    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(TypingError, match="masked_softmax"):
        numba.njit(parallel=True)(via_module)(x)
    with pytest.raises(TypingError, match="masked_softmax"):
        numba.njit(parallel=True)(via_function)(x)
    # ...and the process is fine: the supported way is one call on the whole batch
    assert_matches_reference(fm.masked_softmax(x, backend="numba"), x)


@pytest.mark.filterwarnings("ignore:set_num_threads.*available CPU")  # 3 on 2 CPUs: meant
def test_set_num_threads_while_other_threads_call():
    """Workers of a ThreadPoolExecutor change the process-wide count as they go: no harm."""
    names = [n for n in COMPILED if fm.plugins.backends()[n].status()[0]]
    cases = threaded_cases()
    expected = {n: [fm.masked_softmax(x, m, backend=n) for x, m in cases] for n in names}
    setting = num_threads_setting()

    def worker(seed: int) -> int:
        bad = 0
        for call in range(20):
            fm.set_num_threads(1 + (seed + call) % 3)
            k = (seed + call) % len(cases)
            x, m = cases[k]
            for n in names:
                y = fm.masked_softmax(x, m, backend=n)
                bad += not np.array_equal(y, expected[n][k], equal_nan=True)
        return bad

    try:
        with ThreadPoolExecutor(4) as pool:
            assert sum(pool.map(worker, range(4))) == 0
    finally:
        fm.set_num_threads(setting)


@pytest.mark.parametrize("env", [{}, {"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "passive"}])
def test_openmp_spin_default_and_user_settings(env):
    """fastmask starts its OpenMP runtime with a short spin (good neighbour to BLAS pools)
    unless the user configured one, and leaves the environment as it found it."""
    code = (
        "import os, fastmask.threads as t, fastmask.backends.cython_backend as c\n"
        "assert c._kernels is not None\n"
        "print(t.openmp_spin_setting()); print(os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")  # fmt: skip
    if env:
        assert out[0].startswith("the environment's") and out[1] == env.get(
            "GOMP_SPINCOUNT", "None"
        )
    else:
        assert out[0] == f"GOMP_SPINCOUNT={fm.threads.OPENMP_SPIN_COUNT} (fastmask's default)"
        assert out[1] == "None"
