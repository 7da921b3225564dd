"""The thread count shared by the compiled backends."""

from __future__ import annotations

import os

__all__ = ["available_cpus", "get_num_threads", "set_num_threads", "threads_for"]

#: Below this many logits per thread, a parallel launch costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 32_768


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _from_env() -> int | None:
    for var in ("FASTMASK_NUM_THREADS", "OMP_NUM_THREADS"):
        raw = os.environ.get(var, "").split(",")[0].strip()
        if raw:
            try:
                n = int(raw)
            except ValueError:
                continue
            if n >= 1:
                return n
    return None


_num_threads: int = _from_env() or available_cpus()


def set_num_threads(n: int) -> None:
    """Set how many threads the compiled backends use (process-wide).

    Parameters
    ----------
    n : int
        At least 1. The default comes from ``FASTMASK_NUM_THREADS``, else
        ``OMP_NUM_THREADS``, else the CPUs available to the process.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n = int(n.__index__())  # numpy integers
        except AttributeError:
            raise TypeError(f"set_num_threads() takes an int; got {n!r}") from None
    if n < 1:
        raise ValueError(f"set_num_threads() needs n >= 1; got {n}")
    _num_threads = n


def get_num_threads() -> int:
    """Return the number of threads the compiled backends use."""
    return _num_threads


def threads_for(elements: int, rows: int) -> int:
    """Threads worth using for a call: never more than rows, nor than the work justifies."""
    return max(1, min(_num_threads, rows, elements // MIN_ELEMENTS_PER_THREAD))
