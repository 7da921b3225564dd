"""Helpers of the plugin tests (a uniquely named module, so that this suite and the
core suite can run in one pytest session without their ``conftest`` modules clashing)."""

from __future__ import annotations

import numpy as np

import fastmask_cuda
from fastmask.reference import masked_softmax_reference
from fastmask_cuda import memory

#: True when the tests run on Numba's CUDA simulator (set up by conftest.py).
SIMULATED = memory.simulated()

TOLERANCE = {
    np.dtype(np.float16): {"atol": 1e-3, "rtol": 2e-3},
    np.dtype(np.float32): {"atol": 1e-6, "rtol": 1e-5},
    np.dtype(np.float64): {"atol": 1e-12, "rtol": 1e-12},
}


def dev(a):
    """A device copy of host array ``a`` (exposes ``__cuda_array_interface__``)."""
    return fastmask_cuda.to_device(np.asarray(a))


def dev_view(d, index):
    """``d[index]`` as a device array view (no copy)."""
    if SIMULATED:
        return memory._sim_wrap(d._ary[index])
    return d[index]


def host(d):
    return fastmask_cuda.to_host(d)


def check(y, x, keep=None, bias=None, scale=None, axis=-1):
    """``y`` (host) equals the float64 reference within the dtype's tolerance; masked -> 0."""
    x = np.asarray(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    ref = masked_softmax_reference(x, keep, bias, scale, axis)
    np.testing.assert_allclose(y.astype(np.float64), ref, equal_nan=True, **TOLERANCE[y.dtype])
    if keep is not None:
        masked = ~np.broadcast_to(np.asarray(keep, bool), x.shape) & ~np.isnan(ref)
        assert np.all(y[masked] == 0), "masked positions must be exactly 0"


def logits(rng, shape, dtype=np.float32, spread=4.0):
    return (rng.standard_normal(shape) * spread).astype(dtype)
