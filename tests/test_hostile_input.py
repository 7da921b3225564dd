"""Hostile input: random shapes, strides, dtypes and strategy parameters on every backend.

Each call either raises a clear ``TypeError``/``ValueError`` or returns what the
NumPy reference returns; nothing else (no crash, no other exception type).
"""

from __future__ import annotations

import gc
import resource

import numpy as np
import pytest
from conftest import assert_matches_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmask as fm
from fastmask import masks, router

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

DTYPES = [np.float16, np.float32, np.float64, ">f4", np.int32, np.bool_, np.complex64, object]


def _view(draw, a):
    """A random strided view: steps of +-1/+-2 on some axes, maybe a transpose."""
    idx = tuple(slice(None, None, draw(st.sampled_from([1, -1, 2, -2]))) for _ in range(a.ndim))
    v = a[idx]
    if a.ndim >= 2 and draw(st.booleans()):
        v = v.swapaxes(0, -1)
    return v


@st.composite
def calls(draw):
    nd = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(0, 6)) for _ in range(nd))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    big = tuple(2 * d for d in shape)
    base = np.asarray(rng.standard_normal(big) * 5).astype(dtype)
    x = _view(draw, base) if nd else base
    kind = draw(
        st.sampled_from(["none", "bool", "float", "strategy", "badshape", "padding", "causal"])
    )
    mshape = tuple(draw(st.sampled_from([1, d])) for d in np.shape(x))
    mask: object = None
    if kind == "bool":
        mask = rng.random(mshape) < 0.6
    elif kind == "float":
        mask = rng.random(mshape).astype(np.float32)
    elif kind == "badshape":
        mask = rng.random((*mshape[:-1], 7)) < 0.5 if mshape else np.ones(3, bool)
    elif kind == "padding":
        lengths = draw(
            st.one_of(
                st.integers(-2, 8),
                st.lists(st.integers(-1, 8), min_size=0, max_size=4),
                st.lists(st.floats(allow_nan=True), min_size=1, max_size=3),
            )
        )
        side = draw(st.sampled_from(["left", "right", "middle"]))
        mask = ("padding", lengths, side)
    elif kind == "causal":
        mask = (
            "causal",
            draw(st.integers(-(2**70), 2**70)),
            draw(st.sampled_from(["top-left", "bottom-right"])),
        )
    elif kind == "strategy":
        mask = ("window", draw(st.integers(-1, 8)), draw(st.booleans()))
    bias = None
    if draw(st.booleans()):
        bdtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
        bias = (
            np.where(rng.random(mshape) < 0.2, -np.inf, rng.standard_normal(mshape)).astype(bdtype)
            if bdtype != np.int64
            else np.zeros(mshape, np.int64)
        )
    # Finite scales stay moderate: a float32 overflow of x * scale is a NaN row by design.
    scale = draw(
        st.one_of(st.none(), st.floats(-1e3, 1e3), st.sampled_from([np.nan, np.inf, -np.inf]))
    )
    axis = draw(st.integers(-5, 4))
    return x, mask, bias, scale, axis


def _strategy(spec):
    if not isinstance(spec, tuple):
        return spec
    kind, a, b = spec
    if kind == "padding":
        return masks.padding(a, side=b)
    if kind == "causal":
        return masks.causal(a, align=b)
    return masks.sliding_window(a, causal=b)


@FUZZ
@given(call=calls())
def test_fuzz_clear_error_or_reference_result(backend, call):
    x, mask_spec, bias, scale, axis = call
    try:
        mask = _strategy(mask_spec)
        y = fm.masked_softmax(x, mask, bias=bias, scale=scale, axis=axis, backend=backend)
    except (TypeError, ValueError) as exc:
        assert str(exc), "errors must say what is wrong"
        return
    if isinstance(mask, masks.MaskStrategy):
        keep = mask.to_dense(np.shape(x))
    else:
        keep = mask
    with np.errstate(all="ignore"):
        assert_matches_reference(y, x, keep, bias, scale, axis)


def test_segment_ids_of_the_wrong_length(backend):
    x = np.zeros((2, 3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="k_ids has length 4"):
        fm.masked_softmax(x, masks.segments(np.zeros(4, int), np.zeros(4, int)), backend=backend)
    with pytest.raises(ValueError, match="q_ids has length 3"):
        fm.masked_softmax(x, masks.segments(np.zeros(3, int), np.zeros(5, int)), backend=backend)
    with pytest.raises(ValueError, match="rows"):
        fm.masked_softmax(x, masks.segments(np.zeros((3, 4), int), np.zeros((3, 5), int)))
    with pytest.raises(TypeError, match="integers"):
        masks.segments(np.zeros(4))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_soak_many_small_calls_do_not_leak():
    rng = np.random.default_rng(3)
    shapes = [(1, 8), (2, 3, 7), (1, 2, 4, 16), (3, 33), (2, 2, 2, 2, 5)]
    inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    strategies = [None, masks.causal(), masks.padding(1), None, masks.causal(1)]

    def burst(n):
        for i in range(n):
            k = i % len(shapes)
            fm.masked_softmax(inputs[k], strategies[k])

    burst(5_000)  # warm-up: caches, allocator pools
    gc.collect()
    before = _rss_mb()
    burst(100_000)
    gc.collect()
    growth = _rss_mb() - before
    assert growth < 20, f"resident memory grew by {growth:.1f} MB over 100,000 calls"
    assert len(router._cache) <= router.MAX_CACHED_DECISIONS
