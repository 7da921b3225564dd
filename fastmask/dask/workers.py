"""How many fastmask threads a task uses inside dask's workers.

fastmask's kernels are multi-threaded; so are dask's workers. By default each
task runs fastmask with :func:`task_threads` threads:

* in a ``dask.distributed`` worker: ``max(1, cores // worker threads)``, capped
  by ``OMP_NUM_THREADS`` when that is set. Worker processes started by a
  nanny (the default for ``LocalCluster`` and ``dask worker``) have
  ``OMP_NUM_THREADS=1`` (dask's ``distributed.nanny.pre-spawn-environ``), so
  there each task runs single-threaded: dask's parallelism over tasks is the
  parallelism. Threaded workers in the client process (``processes=False``)
  split the cores between their threads.
* in dask's local threaded scheduler: ``max(1, cores // pool threads)``.
* otherwise (the synchronous scheduler, Ray's dask scheduler, plain calls):
  fastmask's own setting (:func:`fastmask.get_num_threads`, which in a Ray
  worker follows the ``OMP_NUM_THREADS`` that Ray sets for each task).

``FASTMASK_NUM_THREADS`` set in a worker's environment, or ``threads=n`` given to
a call, overrides the rule. While a task runs, fastmask's process-wide thread
count is set to that number (:func:`thread_scope`: tasks running at the same
time in one process share it; the setting in force before them comes back when
the last one ends).
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import threading
from typing import Any

import numpy as np

from ..threads import available_cpus, env_threads, num_threads_setting, set_num_threads

__all__ = ["check_threads", "task_threads", "thread_scope"]


def _distributed_worker() -> Any:
    """The ``dask.distributed`` worker running the current task, or None."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except (ValueError, AttributeError):
        return None


def _worker_nthreads(worker: Any) -> int:
    state = getattr(worker, "state", None)
    n = getattr(state, "nthreads", None) or getattr(worker, "nthreads", None) or 1
    return max(1, int(n))


def _threaded_pool_size() -> int | None:
    """Threads of dask's local threaded scheduler pool running this thread, or None."""
    me = threading.current_thread()
    if me is threading.main_thread():
        return None
    threaded = sys.modules.get("dask.threaded")
    if threaded is None:
        return None
    pools = [getattr(threaded, "default_pool", None)]
    try:
        for per_thread in list(getattr(threaded, "pools", {}).values()):
            pools.extend(list(per_thread.values()))
    except RuntimeError:  # changed while we looked: not worth more than a guess
        pass
    for pool in pools:
        if pool is None:
            continue
        # a pool thread may run its first task before the pool has recorded it in
        # _threads; its name (prefix + "_" + number) says whose it is from the start
        prefix = getattr(pool, "_thread_name_prefix", None)
        if me in getattr(pool, "_threads", ()) or (prefix and me.name.rpartition("_")[0] == prefix):
            return max(1, int(getattr(pool, "_max_workers", 1)))
    return None


def task_threads(threads: int | None = None) -> int | None:
    """How many threads fastmask uses for one task running in this thread.

    Parameters
    ----------
    threads : int, optional
        An explicit count (returned as is).

    Returns
    -------
    int or None
        ``threads`` if given; else ``FASTMASK_NUM_THREADS`` when it is set in this
        process's environment; in a ``dask.distributed``
        worker ``max(1, cores // worker threads)``, capped by ``OMP_NUM_THREADS``
        when set (dask's nanny sets it to 1 in worker processes); in dask's
        local threaded scheduler ``max(1, cores // pool threads)``; otherwise
        None (fastmask's own setting).
    """
    if threads is not None:
        return check_threads(threads)
    pinned = env_threads("FASTMASK_NUM_THREADS")
    if pinned is not None:  # read now: the process may have imported fastmask before it was set
        return pinned
    cores = available_cpus()
    worker = _distributed_worker()
    if worker is not None:
        n = max(1, cores // _worker_nthreads(worker))
        omp = env_threads("OMP_NUM_THREADS")
        return n if omp is None else min(n, omp)
    pool = _threaded_pool_size()
    if pool is not None:
        return max(1, cores // pool)
    return None


def check_threads(threads: Any) -> int | None:
    """Validate a call's ``threads=`` (None, or an int >= 1)."""
    if threads is None:
        return None
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be an int >= 1 or None; got {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1; got {threads}")
    return int(threads)


_scope_lock = threading.Lock()
_scope_depth = 0
_scope_saved: int | None = None  # the setting before the outermost scope (None: the default)


@contextlib.contextmanager
def thread_scope(n: int | None):
    """Run with fastmask's thread count set to ``n`` (None: leave it alone).

    Tasks running at the same time in one process share the count set by the
    first of them; the previous count comes back when the last one ends.
    """
    global _scope_depth, _scope_saved
    if n is None:
        yield
        return
    with _scope_lock:
        if _scope_depth == 0:
            _scope_saved = num_threads_setting()
            set_num_threads(n)
        _scope_depth += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                set_num_threads(_scope_saved)
