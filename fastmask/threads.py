"""The thread count shared by the compiled backends.

Until :func:`set_num_threads` is called, the count comes from the environment:
``FASTMASK_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the CPUs available to
the process, read when fastmask is imported. In a process that has imported Ray
it is read again at each call: Ray sets ``OMP_NUM_THREADS`` to a task's CPUs when
the task starts, in worker processes that run many tasks one after another, so a
``num_cpus=1`` task runs fastmask on one thread and a ``num_cpus=2`` task on two
whatever ran in that worker before (no oversubscription). Elsewhere the look-up
is not repeated: two environment reads would add a microsecond to every call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

__all__ = [
    "OPENMP_SPIN_COUNT",
    "available_cpus",
    "env_threads",
    "get_num_threads",
    "mapped_files",
    "num_threads_setting",
    "openmp_spin_default",
    "openmp_spin_setting",
    "set_num_threads",
    "threads_for",
]

#: Below this many logits per thread, a parallel launch costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 16_384


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


_quota: tuple[float, int | None] = (-1.0, None)  # (when read, CPUs of the quota)
#: The cgroup quota is re-read at most this often (routing asks on every new call
#: shape; opening the file costs more than the rest of an estimate).
_QUOTA_TTL_S = 1.0


def _cgroup_cpus() -> int | None:
    """CPUs of the cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``), None without one."""
    global _quota
    now = time.monotonic()
    if now - _quota[0] < _QUOTA_TTL_S:
        return _quota[1]
    cpus = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = max(1, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    _quota = (now, cpus)
    return cpus


def env_threads(var: str) -> int | None:
    """A thread count from environment variable ``var`` (its first comma-separated
    field, as OpenMP reads ``OMP_NUM_THREADS``); None when unset or empty, and None
    with a ``RuntimeWarning`` naming the variable when it is not an int >= 1."""
    raw = os.environ.get(var, "").split(",")[0].strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n >= 1:
        return n
    warnings.warn(
        f"{var}={os.environ[var]!r} is not a thread count (an int >= 1) and is ignored; "
        f"set it to e.g. {var}=4, or unset it",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def _from_env() -> int | None:
    return env_threads("FASTMASK_NUM_THREADS") or env_threads("OMP_NUM_THREADS")


_cpus: int = available_cpus()
_from_import: int = _from_env() or _cpus
_num_threads: int | None = None  # set_num_threads' count; None: the default


def set_num_threads(n: int | None) -> None:
    """Set how many threads the compiled backends use (process-wide).

    Parameters
    ----------
    n : int or None
        At least 1; or None to go back to the default: ``FASTMASK_NUM_THREADS``,
        else ``OMP_NUM_THREADS``, else the CPUs available to the process (read at
        import, and at each call in a process that has imported Ray).

    Raises
    ------
    TypeError
        ``n`` is not an int.
    ValueError
        ``n < 1``.

    Warns
    -----
    RuntimeWarning
        ``n`` is more than the CPUs available to the process (the setting is kept).
    """
    global _num_threads
    if n is None:
        _num_threads = None
        return
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n = int(n.__index__())  # numpy integers
        except AttributeError:
            raise TypeError(f"set_num_threads() takes an int; got {n!r}") from None
    if n < 1:
        raise ValueError(f"set_num_threads() needs n >= 1; got {n}")
    if n > _cpus:
        warnings.warn(
            f"set_num_threads({n}) on {_cpus} available CPU(s): more threads than CPUs "
            f"take turns on them, which makes calls slower, not faster; "
            f"set_num_threads(None) uses the CPUs there are",
            RuntimeWarning,
            stacklevel=2,
        )
    _num_threads = n


def get_num_threads() -> int:
    """Return the number of threads the compiled backends use (see :func:`set_num_threads`)."""
    n = _num_threads
    if n is not None:
        return n
    if "ray" in sys.modules:  # Ray sets OMP_NUM_THREADS per task, in long-lived workers
        return _from_env() or _cpus
    return _from_import


def num_threads_setting() -> int | None:
    """The count given to :func:`set_num_threads`, or None while the default is in force."""
    return _num_threads


def threads_for(elements: int, rows: int) -> int:
    """Threads worth using for a call: never more than rows, nor than the work justifies."""
    worth = min(rows, elements // MIN_ELEMENTS_PER_THREAD)
    if worth <= 1:  # a small call: no need to look at the setting (nor the environment)
        return 1
    return min(get_num_threads(), worth)


#: Spin iterations of fastmask's OpenMP threads after a parallel region before they
#: sleep (GNU libgomp's ``GOMP_SPINCOUNT``; its default of 300,000 is about 8 ms on the
#: machines we measure on). Measured on 2 cores (Zen 5): a 1024 x 1024 NumPy matmul right
#: after a W1 softmax took 18.9-19.3 ms at the default, 10.7-11.1 ms at 30,000 (10.5 ms
#: alone); back-to-back 2-thread softmax calls of 393k logits took 135 us at 30,000 and
#: 132 us at the default, but 362 us at 1,000 (woken from sleep each time).
OPENMP_SPIN_COUNT = 30_000

_spin_setting: str | None = None  # what fastmask's OpenMP runtime was started with


def mapped_files() -> set[str]:
    """Paths of the files mapped into this process (Linux: /proc/self/maps; elsewhere
    empty): the shared libraries loaded so far."""
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:
        return set()
    return {f[5].strip() for f in fields if len(f) == 6}


def _openmp_runtime_loaded() -> bool:
    """Whether the system's GNU OpenMP runtime (``libgomp.so.1``, the one the extension
    links) is already in this process, so that the environment can no longer configure
    it. The renamed copies that wheels bundle (torch's ``libgomp-<hash>.so.1``) are
    separate runtimes and do not count."""
    return any(p.endswith("/libgomp.so.1") for p in mapped_files())


@contextlib.contextmanager
def openmp_spin_default():
    """Around the first import of the compiled extension: start its OpenMP runtime with
    :data:`OPENMP_SPIN_COUNT`, unless the user set ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY`` (theirs is kept) or a libgomp is already loaded. The variable
    is removed again afterwards: other runtimes loaded later (torch bundles its own)
    and child processes see the environment as the user left it."""
    global _spin_setting
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        _spin_setting = "the environment's (GOMP_SPINCOUNT / OMP_WAIT_POLICY)"
        yield
        return
    if _openmp_runtime_loaded():
        _spin_setting = "the runtime's default (libgomp was loaded before fastmask)"
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    try:
        yield
        _spin_setting = f"GOMP_SPINCOUNT={OPENMP_SPIN_COUNT} (fastmask's default)"
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)


def openmp_spin_setting() -> str | None:
    """How long fastmask's OpenMP threads spin after a region (None before the compiled
    extension is imported)."""
    return _spin_setting
