"""Hypothesis properties, on every backend."""

from __future__ import annotations

import numpy as np
from conftest import assert_matches_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastmask as fm

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9)
finite = st.floats(-50, 50, width=32)


@st.composite
def logits_and_mask(draw, dtype=np.float32):
    shape = draw(shapes)
    x = draw(hnp.arrays(dtype, shape, elements=finite))
    mshape = tuple(draw(st.sampled_from([1, d])) for d in shape)
    keep = draw(hnp.arrays(np.bool_, mshape))
    return x, keep


@SETTINGS
@given(data=logits_and_mask(), dtype=st.sampled_from([np.float32, np.float64]))
def test_rows_sum_to_one_or_zero_and_masked_are_zero(backend, data, dtype):
    x, keep = data
    x = x.astype(dtype)
    y = fm.masked_softmax(x, keep, backend=backend)
    assert_matches_reference(y, x, keep)
    kept = np.broadcast_to(keep, x.shape)
    sums = y.astype(np.float64).sum(-1)
    expected = kept.any(-1).astype(np.float64)
    np.testing.assert_allclose(sums, expected, atol=1e-5)
    assert np.all(y[~kept] == 0)
    assert np.all(y >= 0)


@SETTINGS
@given(data=logits_and_mask(np.float64), shift=st.floats(-1e3, 1e3))
def test_invariant_to_a_constant_per_row(backend, data, shift):
    x, keep = data
    rows_shift = np.full((*x.shape[:-1], 1), shift)
    y1 = fm.masked_softmax(x, keep, backend=backend)
    y2 = fm.masked_softmax(x + rows_shift, keep, backend=backend)
    np.testing.assert_allclose(y1, y2, atol=1e-9)


@SETTINGS
@given(
    data=logits_and_mask(),
    scale=st.floats(-4, 4, allow_nan=False),
    axis=st.integers(-4, 3),
)
def test_any_axis_and_scale(backend, data, scale, axis):
    x, keep = data
    axis = axis % x.ndim
    y = fm.masked_softmax(x, keep, scale=scale, axis=axis, backend=backend)
    assert_matches_reference(y, x, keep, scale=scale, axis=axis)


@SETTINGS
@given(
    b=st.integers(1, 3),
    q=st.integers(1, 7),
    n=st.integers(1, 12),
    offset=st.integers(-8, 8),
    bottom_right=st.booleans(),
    left=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_structured_masks_match_dense(backend, b, q, n, offset, bottom_right, left, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, 2, q, n)).astype(np.float32)
    lengths = rng.integers(0, n + 1, size=b)
    strategy = fm.masks.causal(offset, align="bottom-right" if bottom_right else "top-left")
    strategy = strategy & fm.masks.padding(lengths, side="left" if left else "right")
    y = fm.masked_softmax(x, strategy, backend=backend)
    assert_matches_reference(y, x, strategy.to_dense(x.shape))
