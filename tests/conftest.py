"""Shared fixtures: every backend runs the same tests against the NumPy reference."""

from __future__ import annotations

import os

# The suite must not pick up whatever plugins happen to be installed.
os.environ.setdefault("FASTMASK_LOAD_PLUGINS", "")

import ml_dtypes
import numpy as np
import pytest

import fastmask as fm
from fastmask.reference import masked_softmax_reference

BACKENDS = ("numpy", "numba", "cython")

#: CI sets this so that a backend that cannot run fails the suite instead of skipping.
REQUIRE_ALL = os.environ.get("FASTMASK_REQUIRE_ALL_BACKENDS") == "1"

BF16 = np.dtype(ml_dtypes.bfloat16)

TOLERANCE = {
    np.dtype(np.float16): {"atol": 1e-3, "rtol": 2e-3},
    # Output rounding: half an ulp of an 8-bit significand is 2^-9..2^-8 of the value.
    BF16: {"atol": 1e-5, "rtol": 2**-8},
    np.dtype(np.float32): {"atol": 1e-6, "rtol": 1e-5},
    np.dtype(np.float64): {"atol": 1e-12, "rtol": 1e-12},
}

DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)


class BackendsPlugin:
    """A plugin offering the given backend objects (tests register their toy backends)."""

    def __init__(self, *backends: fm.Backend) -> None:
        self.backends = list(backends)

    @fm.hookimpl
    def fastmask_backends(self):
        return self.backends


def backend_available(name: str) -> tuple[bool, str]:
    backend = fm.plugins.backends().get(name)
    if backend is None:
        return False, f"backend {name!r} is not registered"
    return backend.status()


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    """Run each case with the default tiles of the tiled attention driver and with tiny
    ones (many tiles, partial blocks; tiles start at non-zero queries and keys)."""
    if request.param == "small":
        from fastmask.kernels import tiled_attention

        monkeypatch.setattr(tiled_attention, "TILE_BYTES", 2048)
        monkeypatch.setattr(tiled_attention, "QUERY_BLOCK", 5)
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    ok, why = backend_available(request.param)
    if not ok:
        if REQUIRE_ALL:
            pytest.fail(f"backend {request.param!r} is unavailable: {why}")
        pytest.skip(f"backend {request.param!r} is unavailable: {why}")
    return request.param


def assert_matches_reference(y, x, keep=None, bias=None, scale=None, axis=-1):
    """``y`` equals the float64 reference within the dtype's tolerance; masked entries are 0."""
    x = np.asarray(x)
    y = np.asarray(y)
    assert y.shape == x.shape
    assert y.dtype == x.dtype.newbyteorder("=")
    ref = masked_softmax_reference(x, keep, bias, scale, axis)
    np.testing.assert_allclose(y.astype(np.float64), ref, equal_nan=True, **TOLERANCE[y.dtype])
    if keep is not None:
        masked = ~np.broadcast_to(np.asarray(keep, bool), x.shape) & ~np.isnan(ref)
        assert np.all(y[masked] == 0), "masked positions must be exactly 0"


def logits(rng, shape, dtype=np.float32, spread=4.0):
    return (rng.standard_normal(shape) * spread).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def threaded_cases():
    """Mixed shapes, dtypes and masks, large enough that the compiled backends run with
    several threads (the concurrency and determinism tests share them)."""
    rng = np.random.default_rng(7)
    cases = []
    for i, dtype in enumerate([np.float32, np.float64, np.float16, np.float32]):
        # Large enough that the compiled backends run with several threads.
        shape = [(4, 8, 64, 96), (2, 4, 33, 300), (3, 6, 16, 500), (1, 2, 1, 70_000)][i]
        x = (rng.standard_normal(shape) * 3).astype(dtype)
        b = shape[0]
        mask = [
            fm.masks.padding(rng.integers(0, shape[-1] + 1, b)),
            fm.masks.causal(align="bottom-right"),
            rng.random((b, 1, 1, shape[-1])) < 0.7,
            None,
        ][i]
        cases.append((x, mask))
    return cases
