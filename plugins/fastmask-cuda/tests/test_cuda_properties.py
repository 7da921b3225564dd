"""Hypothesis: random shapes, broadcast masks and biases, NaN/inf mixes, against the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastmask as fm

from cuda_helpers import check, dev, host

pytestmark = pytest.mark.usefixtures("cuda_plugin")

SPECIALS = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 30.0, -30.0])


@st.composite
def calls(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    values = st.floats(-8, 8, width=16)
    x = draw(hnp.arrays(dtype, shape, elements=values))
    for _ in range(draw(st.integers(0, 2))):  # a few NaN / inf / large logits
        idx = tuple(draw(st.integers(0, d - 1)) for d in shape)
        x[idx] = draw(SPECIALS)

    def broadcastable():
        return tuple(
            d if draw(st.booleans()) else 1 for d in shape[draw(st.integers(0, len(shape))) :]
        )

    keep = None
    if draw(st.booleans()):
        keep = draw(hnp.arrays(np.bool_, broadcastable()))
    bias = None
    if draw(st.booleans()):
        bias = draw(hnp.arrays(np.float32, broadcastable(), elements=st.floats(-4, 4, width=32)))
        if bias.size and draw(st.booleans()):
            bias.flat[0] = -np.inf
    scale = draw(st.sampled_from([None, 0.5, 2.0]))
    on_device = draw(st.booleans())
    return x, keep, bias, scale, on_device


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_matches_reference(call):
    x, keep, bias, scale, on_device = call
    k = None if keep is None else (dev(keep) if on_device else keep)
    b = None if bias is None else (dev(bias) if on_device else bias)
    y = host(fm.masked_softmax(dev(x), k, bias=b, scale=scale))
    check(y, x, keep, bias=bias, scale=scale)
