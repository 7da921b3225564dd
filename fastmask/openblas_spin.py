"""NumPy's OpenBLAS thread pool: a short spin, so that its idle workers leave the cores.

OpenBLAS's own thread server (the ``pthreads`` build NumPy and SciPy wheels ship) keeps
each worker busy-waiting for ``2**28`` time-stamp cycles (about 0.1 s) after every
threaded BLAS call before it sleeps. A fastmask call made in that window shares the
cores with those workers: on 2 cores a W1 softmax right after a NumPy matmul took
2.2x its time alone. OpenBLAS reads the length from ``OPENBLAS_THREAD_TIMEOUT`` only
when it starts its threads (at load, and again after a fork or a shutdown), so when
fastmask first loads its compiled kernels it stores its own value in OpenBLAS
(``openblas_read_env`` with the variable set, then removed again) and restarts the
idle pool (``blas_thread_shutdown_``, what OpenBLAS itself does before every fork);
the next BLAS call starts fresh workers that spin :data:`TIMEOUT_EXPONENT` instead.

The restart is skipped while other Python threads are alive (a BLAS call in flight in
another thread must not lose its workers): the value then takes effect at the pool's
next start, e.g. in a forked child. A user's own ``OPENBLAS_THREAD_TIMEOUT`` is left
alone, and ``FASTMASK_OPENBLAS_TIMEOUT=off`` leaves OpenBLAS untouched (an exponent
from 4 to 30 picks another length). Other BLAS libraries (MKL, OpenBLAS built with
OpenMP, Accelerate) are not touched.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

from .threads import mapped_files

__all__ = ["TIMEOUT_EXPONENT", "setting", "shorten"]

#: ``OPENBLAS_THREAD_TIMEOUT`` fastmask gives OpenBLAS: workers spin ``2**18`` cycles
#: (about 0.1 ms) after a call instead of ``2**28`` (about 0.1 s).
TIMEOUT_EXPONENT = 18
_ENV = "FASTMASK_OPENBLAS_TIMEOUT"
_PARALLEL_PTHREADS = 1  # openblas_get_parallel(): 0 serial, 1 pthreads, 2 OpenMP

_lock = threading.Lock()
_settings: dict[str, str] = {}  # library path -> what was done to it


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process."""
    return sorted(p for p in mapped_files() if "openblas" in os.path.basename(p).lower()
                  and ".so" in p)  # fmt: skip


def _symbol(lib: ctypes.CDLL, *names: str):
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    return None


def _exponent() -> int | None:
    """The exponent to store, or None to leave OpenBLAS alone (a bad value: a
    ``RuntimeWarning`` naming the variable, and the default)."""
    raw = os.environ.get(_ENV, "").strip().lower()
    if raw == "off":
        return None
    if not raw:
        return TIMEOUT_EXPONENT
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if 4 <= value <= 30:
        return value
    warnings.warn(
        f"{_ENV}={os.environ[_ENV]!r} is ignored: give an exponent from 4 to 30 (OpenBLAS's "
        f"workers spin 2**exponent cycles after a call; fastmask's default is "
        f"{TIMEOUT_EXPONENT}) or 'off' to leave OpenBLAS's own setting",
        RuntimeWarning,
        stacklevel=3,
    )
    return TIMEOUT_EXPONENT


def _thread_server(path: str):
    """``(library, read_env, shutdown)`` for an OpenBLAS running its own pthreads server,
    else why it is left alone."""
    try:
        lib = ctypes.CDLL(path)  # already loaded: this only takes a reference
    except OSError as exc:
        return f"left alone (cannot open: {exc})"
    suffixes = ("", "64_", "_64")
    prefixes = ("openblas_", "scipy_openblas_")
    get_parallel = _symbol(lib, *(p + "get_parallel" + s for p in prefixes for s in suffixes))
    read_env = _symbol(lib, "openblas_read_env")
    shutdown = _symbol(lib, "blas_thread_shutdown_")
    if get_parallel is None or read_env is None or shutdown is None:
        return "left alone (an OpenBLAS without the thread-server entry points)"
    if get_parallel() != _PARALLEL_PTHREADS:
        return "left alone (not OpenBLAS's own pthreads server)"
    return lib, read_env, shutdown


def _shorten_one(path: str, exponent: int) -> str:
    server = _thread_server(path)
    if isinstance(server, str):
        return server
    lib, read_env, shutdown = server
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(exponent)
    try:
        read_env()  # stores the value; OpenBLAS applies it when it next starts its workers
    finally:
        os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)
    done = f"workers spin 2**{exponent} cycles ({_ENV})"
    if threading.active_count() > 1:
        return done + ", from the pool's next start (other threads were running)"
    try:
        started = ctypes.c_int.in_dll(lib, "blas_server_avail").value
    except ValueError:
        started = 1
    if started:
        shutdown()  # idle workers exit; the next BLAS call starts them with the new value
    return done


def shorten() -> None:
    """Give the OpenBLAS pools loaded now a short spin (once per library; see the module)."""
    with _lock:
        paths = [p for p in _loaded_openblas() if p not in _settings]
        if not paths:
            return
        if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
            for path in paths:
                _settings[path] = "the environment's (OPENBLAS_THREAD_TIMEOUT)"
            return
        exponent = _exponent()
        for path in paths:
            _settings[path] = (
                "left alone (FASTMASK_OPENBLAS_TIMEOUT=off)"
                if exponent is None
                else _shorten_one(path, exponent)
            )


def setting() -> dict[str, str]:
    """What :func:`shorten` did to each OpenBLAS library (for ``fastmask info``)."""
    with _lock:
        return dict(_settings)
