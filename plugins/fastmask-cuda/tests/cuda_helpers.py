"""Helpers of the plugin tests (a uniquely named module, so that this suite and the
core suite can run in one pytest session without their ``conftest`` modules clashing)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import fastmask_cuda
from fastmask.reference import masked_softmax_reference
from fastmask_cuda import memory

#: True when the tests run on Numba's CUDA simulator (set up by conftest.py).
SIMULATED = memory.simulated()

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PLUGIN_ROOT.parents[1]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (fastmask and the plugin on its path, the
    caller's ``NUMBA_ENABLE_CUDASIM`` dropped unless ``env`` sets it)."""
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(PLUGIN_ROOT)])
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


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


#: Attention: products accumulate rounding over D terms, looser than masked_softmax's.
ATTENTION_TOLERANCE = {
    np.dtype(np.float16): {"atol": 2e-3, "rtol": 5e-3},
    np.dtype(np.float32): {"atol": 1e-5, "rtol": 1e-5},
    np.dtype(np.float64): {"atol": 1e-12, "rtol": 1e-12},
}


def attention_reference(q, k, v, keep=None, bias=None, scale=None):
    """``(out, weights)`` of ``softmax(q k^T * scale + bias, masked) @ v`` by definition, float64.

    Grouped-query attention: k and v are repeated along the head axis (-3).
    """
    q, k, v = (np.asarray(a).astype(np.float64) for a in (q, k, v))
    if q.ndim >= 3 and k.ndim >= 3 and k.shape[-3] not in (1, q.shape[-3]):
        g = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    w = masked_softmax_reference(np.matmul(q, np.swapaxes(k, -1, -2)), keep, bias, scale)
    return np.matmul(w, v), w


def check_attention(result, q, k, v, keep=None, bias=None, scale=None):
    """``result`` (device ``out`` or ``(out, weights)``) equals the reference; rows and
    weights that keep nothing are exactly 0."""
    dtype = np.asarray(q).dtype
    ref_o, ref_w = attention_reference(q, k, v, keep, bias, scale)
    outs = result if isinstance(result, tuple) else (result,)
    for got, ref in zip(outs, (ref_o, ref_w), strict=False):
        assert hasattr(got, "__cuda_array_interface__"), "the result must stay on the device"
        y = host(got)
        assert y.dtype == dtype and y.shape == ref.shape
        np.testing.assert_allclose(
            y.astype(np.float64), ref, equal_nan=True, **ATTENTION_TOLERANCE[dtype]
        )
    if keep is not None:
        keep = np.broadcast_to(keep, ref_w.shape)
        empty = ~keep.any(-1) & ~np.isnan(ref_o).any(-1)
        assert np.all(host(outs[0])[empty] == 0), "a query with no kept key gives a zero row"
        if len(outs) == 2:
            w = host(outs[1])
            assert np.all(w[~keep & ~np.isnan(ref_w)] == 0), "masked weights must be exactly 0"


def dev_stored_as(a, order):
    """A device view with the values of host array ``a`` whose memory is laid out in
    axis ``order`` (e.g. ``(0, 2, 1, 3)``: a ``(B, H, L, D)`` view of ``(B, L, H, D)`` memory)."""
    a = np.asarray(a)
    store = dev(np.ascontiguousarray(np.transpose(a, order)))
    inverse = tuple(int(i) for i in np.argsort(order))
    if SIMULATED:
        return memory._sim_wrap(np.transpose(store._ary, inverse))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    strides = tuple(store.strides[i] for i in inverse)
    return DeviceNDArray(a.shape, strides, a.dtype, gpu_data=store.gpu_data)
