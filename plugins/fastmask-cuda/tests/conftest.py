"""Plugin tests: on a real GPU when there is one, else on Numba's CUDA simulator.

The choice is made here, before anything imports ``numba.cuda`` (the simulator
can only be switched on before that import). ``NUMBA_ENABLE_CUDASIM`` set by the
caller wins. The simulator runs every CUDA thread as a Python thread: the
tests use small shapes.
"""

from __future__ import annotations

import ctypes
import os
import sys

# The suite must not pick up whatever plugins happen to be installed.
os.environ.setdefault("FASTMASK_LOAD_PLUGINS", "")


def _real_gpu() -> bool:
    """A CUDA driver that reports at least one device (probed without numba)."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return (
            lib.cuInit(0) == 0
            and lib.cuDeviceGetCount(ctypes.byref(count)) == 0
            and count.value > 0
        )
    return False


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _real_gpu():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastmask as fm  # noqa: E402
import fastmask_cuda.plugin  # noqa: E402
from fastmask_cuda import memory  # noqa: E402

if memory.simulated():
    # Simulated threads wait on each other at every syncthreads; a short GIL switch
    # interval makes the simulator about five times faster.
    sys.setswitchinterval(1e-4)


@pytest.fixture(scope="module")
def cuda_plugin():
    """The plugin registered for the module's tests, and unregistered afterwards."""
    name = fm.plugins.register(fastmask_cuda.plugin, name="fastmask-cuda-tests")
    try:
        yield fastmask_cuda.plugin.BACKEND
    finally:
        fm.plugins.unregister(name=name)


@pytest.fixture
def rng():
    return np.random.default_rng(2024)
