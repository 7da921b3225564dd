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

import os
import sys

__all__ = [
    "available_cpus",
    "env_threads",
    "get_num_threads",
    "num_threads_setting",
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
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def env_threads(var: str) -> int | None:
    """A thread count from environment variable ``var`` (its first comma-separated
    field, as OpenMP reads ``OMP_NUM_THREADS``); None when unset or not an int >= 1."""
    raw = os.environ.get(var, "").split(",")[0].strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


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
