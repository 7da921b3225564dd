"""The cuda backend against the NumPy reference: every mask kind, dtype and layout.

Small shapes: under the simulator every CUDA thread is a Python thread.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmask as fm
from fastmask.reference import masked_softmax_reference
from fastmask_cuda import kernels

from cuda_helpers import check, dev, dev_view, host, logits

pytestmark = pytest.mark.usefixtures("cuda_plugin")

DTYPES = (np.float16, np.float32, np.float64)
SHAPE = (2, 2, 3, 8)  # (B, H, Lq, Lk): 12 rows


def _masks(shape):
    b, _, q, n = shape
    rng = np.random.default_rng(7)
    dense = rng.random((b, 1, 1, n)) < 0.6
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2][:n])
    return {
        "none": None,
        "keep": fm.masks.keep(dense),
        "drop": fm.masks.drop(~dense),
        "bool-array": dense,
        "padding": fm.masks.padding([5, 0]),
        "padding-left": fm.masks.padding([3, 8], side="left"),
        "causal": fm.masks.causal(),
        "causal-bottom-right": fm.masks.causal(align="bottom-right"),
        "sliding": fm.masks.sliding_window(2),
        "sliding-band": fm.masks.sliding_window(3, causal=False, align="bottom-right"),
        "segments": fm.masks.segments(ids[:q], ids),
        "segments-dense": fm.masks.segments(ids[:q], np.array([0, 1, 0, 1, 2, 2, 0, 1][:n])),
        "prefix_lm": fm.masks.prefix_lm([4, 1]),
        "padding&causal": fm.masks.padding([6, 3]) & fm.masks.causal(offset=2),
        "keep&sliding": fm.masks.keep(dense) & fm.masks.sliding_window(4),
    }


def _dense(mask, shape):
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        return mask
    return mask.to_dense(shape)


@pytest.mark.parametrize("kind", list(_masks(SHAPE)))
def test_every_mask_kind_float32(kind, rng):
    mask = _masks(SHAPE)[kind]
    x = logits(rng, SHAPE)
    y = fm.masked_softmax(dev(x), mask)
    check(host(y), x, _dense(mask, SHAPE))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("kind", ["none", "keep", "padding&causal", "segments-dense"])
def test_mask_kinds_other_dtypes(kind, dtype, rng):
    mask = _masks(SHAPE)[kind]
    x = logits(rng, SHAPE, dtype)
    y = fm.masked_softmax(dev(x), mask, scale=0.5)
    check(host(y), x, _dense(mask, SHAPE), scale=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_scale_and_mask(dtype, rng):
    shape = (2, 1, 3, 8)
    x = logits(rng, shape, dtype)
    bias = logits(rng, (1, 1, 3, 8), dtype, spread=2.0)
    bias[..., 0, 5:] = -np.inf
    mask = fm.masks.causal(offset=3)
    y = fm.masked_softmax(dev(x), mask, bias=bias, scale=0.25)
    check(host(y), x, mask.to_dense(shape), bias=bias, scale=0.25)


def test_device_bias_of_another_dtype_and_device_mask(rng):
    shape = (2, 2, 2, 8)
    x = logits(rng, shape, np.float32)
    bias = logits(rng, (2, 1, 1, 8), np.float64, spread=1.0)  # float64 bias, float32 logits
    keep = rng.random((1, 2, 2, 8)) < 0.5
    y = fm.masked_softmax(dev(x), dev(keep), bias=dev(bias))
    check(host(y), x, keep, bias=bias)


def test_tf_style_bias_float16(rng):
    """-1e9 biases in float16 logits: computed in float32, no overflow to NaN rows."""
    shape = (2, 1, 2, 8)
    x = logits(rng, shape, np.float16)
    pad = np.zeros((2, 1, 1, 8), np.float32)
    pad[0, ..., 4:] = 1.0
    pad[1] = 1.0  # every key padded: in float32 arithmetic, -1e9 swamps the logits
    y = host(fm.masked_softmax(dev(x), bias=pad * -1e9))
    check(y[:1], x[:1], bias=pad[:1] * -1e9)
    expect = masked_softmax_reference(x[1:], bias=pad[1:] * -1e9, dtype=None)
    np.testing.assert_allclose(y[1:], expect, rtol=1e-3)  # uniform, as in TensorFlow


def test_special_values():
    x = np.zeros((6, 8), np.float32)
    x[0, 3] = np.nan  # kept NaN: the row is NaN
    x[1, 3] = np.nan  # NaN at a masked position: ignored
    x[2, 2] = np.inf  # kept +inf: NaN row
    x[3, :] = -np.inf  # every logit -inf: zeros
    x[4, :4] = -np.inf  # some -inf: they get 0 weight
    x[5, 5] = 50.0
    keep = np.ones((6, 8), bool)
    keep[1, 3] = False
    keep[5, :] = False  # nothing kept: zeros
    y = host(fm.masked_softmax(dev(x), dev(keep)))
    check(y, x, keep)
    assert np.isnan(y[0]).all() and np.isnan(y[2]).all()
    assert not np.isnan(y[1]).any() and y[1, 3] == 0
    assert (y[3] == 0).all() and (y[5] == 0).all()


def test_fully_masked_rows_are_zeros_for_structured_masks(rng):
    x = logits(rng, (2, 1, 3, 8))
    y = host(fm.masked_softmax(dev(x), fm.masks.padding([0, 8]) & fm.masks.causal(offset=-1)))
    assert (y[0] == 0).all() and (y[1, 0, 0] == 0).all()
    np.testing.assert_allclose(y[1, 0, 1:].sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_per_row_kernel(dtype, rng, monkeypatch):
    """Long rows (here: forced by a low threshold) take one block per row, several warps."""
    monkeypatch.setattr(kernels, "WARP_MAX_N", 4)
    monkeypatch.setattr(kernels, "BLOCK_THREADS_MIN", 64)
    shape = (2, 1, 1, 150)  # 150 keys over 64 threads: several keys per thread, 2 warps
    x = logits(rng, shape, dtype)
    x[1, 0, 0, 100] = np.nan
    mask = fm.masks.padding([140, 150]) & fm.masks.sliding_window(120, align="bottom-right")
    bias = logits(rng, (1, 1, 1, 150), dtype, spread=1.0)
    y = fm.masked_softmax(dev(x), mask, bias=bias)
    check(host(y), x, mask.to_dense(shape), bias=bias)


def test_block_kernel_empty_and_dense(rng, monkeypatch):
    monkeypatch.setattr(kernels, "WARP_MAX_N", 4)
    monkeypatch.setattr(kernels, "BLOCK_THREADS_MIN", 64)
    x = logits(rng, (3, 70))
    keep = rng.random((3, 70)) < 0.3
    keep[2] = False
    y = host(fm.masked_softmax(dev(x), dev(keep)))
    check(y, x, keep)


def test_axis_not_last_with_dense_mask(rng):
    x = logits(rng, (5, 2, 3))
    keep = rng.random((5, 1, 3)) < 0.7
    y = host(fm.masked_softmax(dev(x), keep, axis=0))
    check(y, x, keep, axis=0)


def test_strided_device_view_and_split_request(rng):
    """A non-contiguous x, and a 5-D call whose middle axes do not fold (split per axis 1)."""
    base = dev(logits(rng, (2, 6, 10)))
    view = dev_view(base, (slice(None), slice(None, None, 2), slice(1, 9)))  # (2, 3, 8)
    xv = host(view)
    check(
        host(fm.masked_softmax(view, fm.masks.causal())), xv, fm.masks.causal().to_dense(xv.shape)
    )

    x = logits(rng, (2, 2, 3, 2, 4))
    keep = rng.random((2, 1, 3, 2, 4)) < 0.6  # middle strides (0, s): no single head stride
    y = host(fm.masked_softmax(dev(x), dev(keep)))
    check(y, x, keep)


def test_out_and_in_place(rng):
    x = logits(rng, (3, 8))
    dx = dev(x)
    out = dev(np.full((3, 8), 7.0, np.float32))
    r = fm.masked_softmax(dx, fm.masks.padding(5), out=out)
    assert r is out
    check(host(out), x, fm.masks.padding(5).to_dense(x.shape))
    np.testing.assert_array_equal(host(dx), x)  # the input is not modified

    r = fm.masked_softmax(dx, fm.masks.causal(), out=dx)  # in place
    assert r is dx
    check(host(dx), x, fm.masks.causal().to_dense(x.shape))


def test_out_errors(rng):
    x = dev(logits(rng, (4, 8)))
    with pytest.raises(ValueError, match="device array"):
        fm.masked_softmax(x, out=np.empty((4, 8), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        fm.masked_softmax(x, out=dev(np.empty((4, 8), np.float64)))
    with pytest.raises(ValueError, match="shape"):
        fm.masked_softmax(x, out=dev(np.empty((4, 7), np.float32)))
    with pytest.raises(ValueError, match="overlaps"):
        fm.masked_softmax(dev_view(x, slice(0, 2)), out=dev_view(x, slice(1, 3)))


def test_validation_matches_host_rules(rng):
    x = dev(logits(rng, (2, 3, 8)))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fm.masked_softmax(dev(np.zeros((2, 3), np.int32)))
    with pytest.raises(TypeError, match=r"masks\.keep"):
        fm.masked_softmax(x, dev(np.ones((2, 3, 8), np.float32)))
    with pytest.raises(TypeError, match=r"masks\.drop"):
        fm.masked_softmax(x, np.ones((2, 3, 8), np.int8))
    with pytest.raises(ValueError, match="softmax axis last"):
        fm.masked_softmax(x, fm.masks.causal(), axis=1)
    with pytest.raises(ValueError, match="does not broadcast"):
        fm.masked_softmax(x, bias=dev(np.zeros((3, 3), np.float32)))
    with pytest.raises(ValueError, match="does not broadcast"):
        fm.masked_softmax(x, dev(np.ones((4, 8), bool)))
    with pytest.raises(ValueError, match="finite"):
        fm.masked_softmax(x, scale=np.inf)
    with pytest.raises(np.exceptions.AxisError):
        fm.masked_softmax(x, axis=3)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fm.masked_softmax(x, bias=dev(np.zeros(8, np.int64)))


def test_empty_and_one_key(rng):
    y = fm.masked_softmax(dev(np.zeros((0, 4), np.float32)))
    assert host(y).shape == (0, 4)
    x = logits(rng, (3, 1), np.float64)
    check(host(fm.masked_softmax(dev(x))), x)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_forced_host_arrays(dtype, rng):
    x = logits(rng, (2, 2, 3, 8), dtype)
    mask = fm.masks.padding([5, 2]) & fm.masks.causal(offset=1)
    bias = logits(rng, (2, 1, 1, 8), np.float32, spread=1.0)
    y = fm.masked_softmax(x, mask, bias=bias, backend="cuda")
    assert isinstance(y, np.ndarray)
    check(y, x, mask.to_dense(x.shape), bias=bias)


def test_forced_host_in_place_and_strided(rng):
    x = logits(rng, (4, 3, 8))
    ref = x.copy()
    fm.masked_softmax(x, fm.masks.keep(ref > 0), axis=-1, out=x, backend="cuda")
    check(x, ref, ref > 0)
    xt = logits(rng, (8, 3))
    check(fm.masked_softmax(xt, axis=0, backend="cuda"), xt, axis=0)


def test_host_operands_as_broadcast_and_strided_views(rng):
    shape = (2, 2, 3, 8)
    x = logits(rng, shape)
    bias = np.broadcast_to(logits(rng, (1, 1, 1, 8), np.float64, spread=1.0), shape)
    big = rng.random((2, 2, 3, 40)) < 0.7
    keep = big[..., ::5]  # a strided view: its span is compacted before the copy
    y = host(fm.masked_softmax(dev(x), keep, bias=bias))
    check(y, x, keep, bias=bias)
