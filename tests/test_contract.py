"""The precision contract (docs/api.md), drawn by hypothesis, on every backend.

Magnitudes up to each dtype's maximum and down to its subnormals, shared offsets,
large and inexact scales, every dtype, strided and broadcast layouts, dense and
structured masks, biases: each result is checked against the float64 reference
formed from the inputs, with the documented tolerances. Where docs/api.md states
a limit of the contract (a bias whose sum with the logits overflows the compute
dtype), the draw stays inside it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import DTYPES, TOLERANCE
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastmask as fm
from fastmask.reference import masked_softmax_reference

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

#: Offsets a bias may share across a row (docs/api.md): float32 rows whose z reaches
#: 2**30 are formed in float64 as the reference forms them, up to float32's maximum.
OFFSET_LIMIT = {np.dtype(np.float64): 2.0**59}
F32_OFFSET_LIMIT = 3e38


def _finfo(dtype):
    return ml_dtypes.finfo(dtype)


@st.composite
def magnitudes(draw, dtype):
    """A row scale: anything from the dtype's subnormals to its maximum."""
    fi = _finfo(dtype)
    lo = float(fi.smallest_subnormal) if hasattr(fi, "smallest_subnormal") else float(fi.tiny)
    exp = draw(st.floats(np.log2(lo), np.log2(float(fi.max)), allow_nan=False))
    with np.errstate(over="ignore"):
        return min(float(np.exp2(exp)), float(fi.max))


@st.composite
def rows(draw, dtype):
    """Logits (R, N): per row a magnitude, a spread relative to it, and an offset."""
    r = draw(st.integers(1, 4))
    n = draw(st.sampled_from([1, 2, 3, 15, 16, 17, 64, 65, 130]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    fi_max = float(_finfo(dtype).max)
    x = np.empty((r, n))
    for i in range(r):
        mag = draw(magnitudes(dtype))
        spread = draw(st.sampled_from([0.0, 1e-7, 1e-3, 1.0, 30.0]))
        centre = draw(st.sampled_from([0.0, 1.0, -1.0]))
        row = mag * (centre + spread * rng.standard_normal(n))
        x[i] = np.clip(row, -fi_max, fi_max)
    x = x.astype(dtype)
    assume(np.isfinite(x.astype(np.float64)).all())
    return x


scales = st.one_of(
    st.none(),
    st.sampled_from([1 / np.sqrt(96), 0.125, 1.0, -1.0, 0.0, 2.0, 1e-30, 1e-300, 3e9]),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
)


def _check(y, x, keep=None, bias=None, scale=None):
    y = np.asarray(y)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref = masked_softmax_reference(x, keep, bias, scale)
    with np.errstate(invalid="ignore"):
        assert np.isfinite(ref).all() or bias is not None, "the reference itself overflowed"
    np.testing.assert_allclose(y.astype(np.float64), ref, equal_nan=True, **TOLERANCE[y.dtype])
    if keep is not None:
        masked = ~np.broadcast_to(keep, x.shape)
        assert np.all(y[masked] == 0), "masked positions must be exactly 0"


def _z_in_range(x, scale, bias, dtype):
    """Whether x * scale (+ bias) is finite in float64 and, with a bias, in the compute
    dtype: the documented domain of the contract."""
    s = 1.0 if scale is None else scale
    with np.errstate(over="ignore", invalid="ignore"):
        z = x.astype(np.float64) * s
        if not np.isfinite(z).all():
            return False
        if bias is None:
            return True
        z = z + np.broadcast_to(bias.astype(np.float64), z.shape)
        compute_max = 1.7e308 if np.dtype(dtype) == np.float64 else 3.4e38
        return bool(np.isfinite(z).all() and np.abs(z).max() < compute_max)


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), scale=scales)
def test_any_finite_magnitude_and_scale(backend, data, dtype, scale):
    x = data.draw(rows(dtype))
    assume(_z_in_range(x, scale, None, dtype))
    if np.dtype(dtype) == np.float64 and scale is not None:
        # float64's own rounding of x * scale is the reference's: the contract's 1e-12
        # holds while that rounding (|x * scale| * 2**-53) stays below it.
        assume(np.abs(x * scale).max() < 1e3)
    y = fm.masked_softmax(x, scale=scale, backend=backend)
    _check(y, x, scale=scale)
    assert np.isfinite(np.asarray(y, np.float64)).all(), "finite logits gave a non-finite weight"


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_a_shared_offset_in_the_bias(backend, data, dtype):
    x = data.draw(rows(dtype))
    assume(np.abs(x.astype(np.float64)).max() < 1e3)
    limit = OFFSET_LIMIT.get(np.dtype(dtype), F32_OFFSET_LIMIT)
    if np.dtype(dtype) == np.float64:
        limit = 1e3  # the float64 reference rounds x + offset itself beyond this
    # log-uniform magnitudes: every band up to the limit (2**24, 2**30, 1e10, ...) is drawn
    offset = data.draw(st.sampled_from([-1.0, 1.0])) * 10.0 ** data.draw(
        st.floats(-3.0, float(np.log10(limit)))
    )
    keep = data.draw(st.sampled_from([None, "dense"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    assume(abs(offset) <= float(_finfo(dtype).max))
    bias = np.full(x.shape, offset).astype(dtype)
    keep = None if keep is None else rng.random(x.shape) < 0.7
    assume(_z_in_range(x, None, bias, dtype))
    y = fm.masked_softmax(x, keep, bias=bias, backend=backend)
    _check(y, x, keep=keep, bias=bias)


@SETTINGS
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "strided", "broadcast-mask"]),
    mask=st.sampled_from(["none", "dense", "padding", "causal", "window", "tf-bias"]),
    scale=st.sampled_from([None, 1 / np.sqrt(96), 0.5]),
)
def test_layouts_masks_and_biases(backend, data, dtype, layout, mask, scale):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b, h = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    q, n = data.draw(st.integers(1, 9)), data.draw(st.sampled_from([1, 5, 16, 33, 100]))
    spread = data.draw(st.sampled_from([1.0, 8.0, 100.0]))
    base = (rng.standard_normal((b, h, q, 2 * n)) * spread).astype(dtype)
    x = {
        "contiguous": base[..., :n].copy(),
        "transposed": base[..., :n].copy().swapaxes(1, 2).copy().swapaxes(1, 2),
        "strided": base[..., ::2],
        "broadcast-mask": base[..., :n].copy(),
    }[layout]
    keep = bias = strategy = None
    if mask == "dense":
        shape = (b, 1, 1, n) if layout == "broadcast-mask" else x.shape
        keep = rng.random(shape) < 0.6
        strategy = keep
    elif mask == "padding":
        strategy = fm.masks.padding(rng.integers(0, n + 1, b), side=rng.choice(["left", "right"]))
    elif mask == "causal":
        strategy = fm.masks.causal(int(rng.integers(-3, 4)), align="bottom-right")
    elif mask == "window":
        strategy = fm.masks.sliding_window(int(rng.integers(1, n + 2)))
    elif mask == "tf-bias":
        shape = (b, 1, 1, n) if layout == "broadcast-mask" else x.shape
        with np.errstate(over="ignore"):  # -1e9 is -inf in float16, as in TensorFlow
            bias = np.where(rng.random(shape) < 0.3, -1e9, 0.0).astype(dtype)
    if strategy is not None and not isinstance(strategy, np.ndarray):
        keep = strategy.to_dense(x.shape)
    y = fm.masked_softmax(x, strategy, bias=bias, scale=scale, backend=backend)
    _check(y, x, keep=keep, bias=bias, scale=scale)


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_a_bias_that_cancels_large_logits(backend, data, dtype):
    """x * scale + bias small while both terms are large (a relative-position bias
    against large logits): rounding either term first would lose the difference."""
    x = data.draw(rows(dtype))
    # Inexact scales too: a float32-rounded scale would be off from the reference's by
    # (x_i - x_j) * scale * 2**-24 between keys the bias brings together.
    scale = data.draw(st.sampled_from([None, 1.0, 0.5, 0.125, 1 / np.sqrt(96), 0.1, 1 / 3]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    s = 1.0 if scale is None else scale
    with np.errstate(over="ignore", invalid="ignore"):
        bias = (-x.astype(np.float64) * s + rng.standard_normal(x.shape) * 4).astype(dtype)
    assume(_z_in_range(x, scale, bias, dtype))
    if np.dtype(dtype) == np.float64:
        assume(np.abs(x * s).max() < 1e3)  # the reference's own rounding (see above)
    y = fm.masked_softmax(x, bias=bias, scale=scale, backend=backend)
    _check(y, x, bias=bias, scale=scale)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_logits_plus_bias_beyond_the_compute_dtype(backend, dtype):
    """x * scale + bias overflows float32 (the compute dtype) but not float64: the
    weights are still the float64 reference's, on every backend."""
    big = float(np.finfo(dtype).max)
    x = np.array([[big, big / 2, 1.0, -big], [1.0, 2.0, 3.0, 4.0]], dtype)
    bias = np.array([[3e38, 3e38, 0.0, 3e38], [3e38, -3e38, 3e38, 3e38]], np.float32)
    for scale in (None, 2.0, 1e30):
        with np.errstate(over="ignore"):
            y = fm.masked_softmax(x, bias=bias, scale=scale, backend=backend)
        _check(y, x, bias=bias, scale=scale)
