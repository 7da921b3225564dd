"""fastmask inside Ray tasks and actors: the in-memory results, one thread per reserved CPU.

One local Ray instance (2 CPUs, no dashboard, a small object store) serves the
whole module. Ray sets ``OMP_NUM_THREADS`` to the CPUs a task reserves when the
task starts, in worker processes that run many tasks one after another;
fastmask must follow it at each call (not only when it was first imported in
that worker), or a worker that imported it in a 1-CPU task runs 2-CPU tasks on
one thread, and the other way round oversubscribes the machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need ray: pip install 'fastmask[ray]'")

from conftest import TOLERANCE  # noqa: E402

import fastmask as fm  # noqa: E402
from fastmask import masks  # noqa: E402

CPUS = 2
ROOT = str(Path(fm.__file__).resolve().parent.parent)


def _pinned() -> int | None:
    """A thread count this process's environment forces on Ray's workers (they inherit it)."""
    for var in ("FASTMASK_NUM_THREADS", "OMP_NUM_THREADS"):
        raw = os.environ.get(var, "").split(",")[0].strip()
        if raw.isdigit() and int(raw) >= 1:
            return int(raw)
    return None


@pytest.fixture(scope="module")
def ray_session():
    # Workers import this module's functions by value and fastmask from ROOT, so the
    # tests also run from a checkout that is not installed.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=CPUS,
        include_dashboard=False,
        object_store_memory=80 * 1024**2,
        log_to_driver=False,
        ignore_reinit_error=True,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _check(y, ref, what=""):
    y = np.asarray(y)
    assert y.dtype == ref.dtype and y.shape == ref.shape, what
    np.testing.assert_allclose(y, ref, equal_nan=True, err_msg=what, **TOLERANCE[ref.dtype])
    assert np.all(y[ref == 0] == 0), f"{what}: positions that are 0 in memory must be exactly 0"


def _cases():
    """``(name, function, args, kwargs)``: softmax and attention with every kind of mask."""
    rng = np.random.default_rng(0)
    b, h, lq, lk, d = 2, 4, 32, 48, 16
    x = rng.standard_normal((b, h, lq, lk), dtype=np.float32) * 3
    q = rng.standard_normal((b, h, lq, d), dtype=np.float32)
    k = rng.standard_normal((b, 2, lk, d), dtype=np.float32)  # grouped-query: 2 kv heads
    v = rng.standard_normal((b, 2, lk, d), dtype=np.float32)
    padding = masks.padding(np.array([lk, 17]))
    dense = rng.random((b, 1, lq, lk)) > 0.3
    bias = np.where(rng.random((1, h, 1, lk)) > 0.2, 0.0, -np.inf).astype(np.float32)
    return [
        ("softmax padding", fm.masked_softmax, (x, padding), {"scale": 0.5}),
        ("softmax causal", fm.masked_softmax, (x.astype(np.float64), masks.causal()), {}),
        ("softmax dense", fm.masked_softmax, (x, dense), {}),
        ("softmax bias", fm.masked_softmax, (x,), {"bias": bias}),
        ("attention padding", fm.attention, (q, k, v, padding), {}),
        ("attention causal", fm.attention, (q, k, v, masks.causal(align="bottom-right")), {}),
        ("attention dense", fm.attention, (q, k, v, dense), {}),
        ("attention bias", fm.attention, (q, k, v), {"bias": bias, "return_weights": True}),
    ]


def _call(fn, args, kwargs):
    return fn(*args, **kwargs)


def test_remote_tasks_give_the_in_memory_results(ray_session):
    cases = _cases()
    call = ray.remote(num_cpus=1)(_call)
    futures = [call.remote(fn, args, kwargs) for _, fn, args, kwargs in cases]
    for (name, fn, args, kwargs), got in zip(cases, ray.get(futures), strict=True):
        want = fn(*args, **kwargs)
        if isinstance(want, tuple):
            for g, w in zip(got, want, strict=True):
                _check(g, w, name)
        else:
            _check(got, want, name)


def _threads_here():
    """In a task: the worker, Ray's OMP_NUM_THREADS, fastmask's count, and what a big call uses."""
    import fastmask as fm
    from fastmask.threads import threads_for

    return (
        os.getpid(),
        os.environ.get("OMP_NUM_THREADS"),
        fm.get_num_threads(),
        threads_for(10**8, 10**5),
    )


def test_tasks_use_the_cpus_they_reserve(ray_session):
    probe = ray.remote(_threads_here)
    # one after another, so that Ray reuses its workers for tasks of both sizes
    for cpus in (1, CPUS, 1, CPUS, 0.5):
        _, omp, n, big = ray.get(probe.options(num_cpus=cpus).remote())
        expected = _pinned() or max(1, int(cpus))
        assert (n, big) == (expected, expected), (cpus, omp, n, big)
    assert ray.get(probe.options(num_cpus=1).remote())[2] <= CPUS  # never more than the node


class _Attender:
    """An actor whose method runs in several threads at once (``max_concurrency``)."""

    def __init__(self, threads=None):
        import fastmask as fm

        if threads is not None:  # the docs' advice for a threaded actor
            fm.set_num_threads(threads)

    def run(self, i):
        import threading
        import time

        import fastmask as fm

        rng = np.random.default_rng(i)
        q = rng.standard_normal((2, 4, 64, 32), dtype=np.float32)
        x = rng.standard_normal((8, 8, 64, 256), dtype=np.float32)  # big enough for threads
        mask = fm.masks.padding(np.arange(8) * 30 + i)
        time.sleep(0.05)  # let the calls overlap
        return (
            threading.get_ident(),
            fm.get_num_threads(),
            fm.attention(q, q, q, fm.masks.causal()),
            fm.masked_softmax(x, mask),
        )


def _actor_reference(i):
    rng = np.random.default_rng(i)
    q = rng.standard_normal((2, 4, 64, 32), dtype=np.float32)
    x = rng.standard_normal((8, 8, 64, 256), dtype=np.float32)
    mask = masks.padding(np.arange(8) * 30 + i)
    return fm.attention(q, q, q, masks.causal()), fm.masked_softmax(x, mask)


@pytest.mark.parametrize("threads", [None, 1])
def test_threaded_actor_calls_concurrently(ray_session, threads):
    actor = ray.remote(_Attender).options(num_cpus=CPUS, max_concurrency=4).remote(threads)
    try:
        results = ray.get([actor.run.remote(i) for i in range(8)])
    finally:
        ray.kill(actor)
    idents = {r[0] for r in results}
    assert len(idents) > 1, "the actor's calls did not run in several threads"
    # Ray sets OMP_NUM_THREADS to the actor's CPUs: without set_num_threads, each of
    # the concurrent calls may use all of them (see docs/dask.md, "Ray")
    expected = threads or _pinned() or CPUS
    assert {r[1] for r in results} == {expected}
    for i, (_, _, o, w) in enumerate(results):
        ref_o, ref_w = _actor_reference(i)
        _check(o, ref_o)
        _check(w, ref_w)


def test_dask_graphs_on_ray(ray_session):
    pytest.importorskip("dask.array", reason="needs dask: pip install 'fastmask[dask]'")
    ray_dask = pytest.importorskip(
        "ray.util.dask", reason="ray.util.dask needs dask.dataframe (pandas, pyarrow)"
    )
    import dask.array as da

    import fastmask.dask as fmd

    x = np.random.default_rng(1).standard_normal((3, 2, 6, 20)).astype(np.float32)
    y = fmd.masked_softmax(da.from_array(x, chunks=(1, 2, 3, 7)), masks.causal())
    _check(y.compute(scheduler=ray_dask.ray_dask_get), fm.masked_softmax(x, masks.causal()))
