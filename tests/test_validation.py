"""Bad input gets a clear exception, before any kernel runs."""

from __future__ import annotations

import numpy as np
import pytest

import fastmask as fm
from fastmask import masks

X = np.zeros((2, 3, 4, 5), np.float32)


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.bool_, np.complex64, object, np.uint8, np.longdouble]
)
def test_x_dtype_rejected(dtype):
    if np.dtype(dtype) == np.float64:  # longdouble may be float64 on some platforms
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fm.masked_softmax(np.zeros((2, 3), dtype))


def test_structured_dtype_rejected():
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fm.masked_softmax(np.zeros(3, dtype=[("a", "f4")]))


def test_zero_d_rejected():
    with pytest.raises(ValueError, match="at least one axis"):
        fm.masked_softmax(np.float32(1.0))


@pytest.mark.parametrize("mask_dtype", [np.float32, np.int64, np.uint8])
def test_non_bool_mask_points_at_conventions(mask_dtype):
    with pytest.raises(TypeError) as info:
        fm.masked_softmax(X, np.ones((2, 1, 1, 5), mask_dtype))
    msg = str(info.value)
    assert "masks.keep" in msg and "masks.drop" in msg and "bias=" in msg


def test_mask_shape_must_broadcast():
    with pytest.raises(ValueError, match="does not broadcast"):
        fm.masked_softmax(X, np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="more than"):
        fm.masked_softmax(X, np.ones((1, 1, 1, 1, 5), bool))


def test_bias_checks():
    with pytest.raises(TypeError, match="bias must be float"):
        fm.masked_softmax(X, bias=np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        fm.masked_softmax(X, bias=np.zeros(4, np.float32))


@pytest.mark.parametrize("scale", [np.inf, -np.inf, np.nan])
def test_scale_must_be_finite(scale):
    with pytest.raises(ValueError, match="finite"):
        fm.masked_softmax(X, scale=scale)


@pytest.mark.parametrize("scale", ["2", 1j, True, [1.0]])
def test_scale_type(scale):
    with pytest.raises(TypeError, match="scale"):
        fm.masked_softmax(X, scale=scale)


def test_axis_checks():
    with pytest.raises(np.exceptions.AxisError):
        fm.masked_softmax(X, axis=4)
    with pytest.raises(TypeError, match="axis"):
        fm.masked_softmax(X, axis=1.0)
    with pytest.raises(ValueError, match="softmax axis last"):
        fm.masked_softmax(X, masks.causal(), axis=1)


def test_out_checks():
    with pytest.raises(ValueError, match="shape"):
        fm.masked_softmax(X, out=np.empty((2, 3, 4, 6), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        fm.masked_softmax(X, out=np.empty(X.shape, np.float64))
    ro = np.empty(X.shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fm.masked_softmax(X, out=ro)
    raw = np.zeros(X.nbytes + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, count=X.size, offset=1).reshape(X.shape)
    unaligned.flags.writeable = True
    with pytest.raises(ValueError, match="aligned"):
        fm.masked_softmax(X, out=unaligned)
    base = np.zeros((3, 6), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        fm.masked_softmax(base[:2], out=base[1:])


@pytest.mark.parametrize(
    "lengths,exc,match",
    [
        ([1, -1], ValueError, ">= 0"),
        ([1, 6], ValueError, "<= Lk"),
        ([1, 2, 3], ValueError, "batch of 2"),
        ([1.5, 2.0], TypeError, "integers"),
        ([np.nan, 2.0], TypeError, "integers"),
        ([[1, 2]], ValueError, "1-D"),
        ([True, False], TypeError, "integers"),
    ],
)
def test_padding_checks(lengths, exc, match):
    with pytest.raises(exc, match=match):
        fm.masked_softmax(X, masks.padding(lengths))


def test_padding_side_and_causal_checks():
    with pytest.raises(ValueError, match="side"):
        masks.padding(3, side="top")
    with pytest.raises(TypeError, match="integer"):
        masks.causal(1.5)
    with pytest.raises(TypeError, match="bool"):
        masks.causal(True)
    with pytest.raises(ValueError, match="align"):
        masks.causal(align="diagonal")


def test_unknown_and_unable_backend():
    with pytest.raises(ValueError, match="unknown backend 'nope'; available: .*numpy"):
        fm.masked_softmax(X, backend="nope")


def test_list_input_accepted():
    y = fm.masked_softmax([[0.0, 0.0]])
    assert y.dtype == np.float64 and y.tolist() == [[0.5, 0.5]]
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fm.masked_softmax([[1, 2]])


def test_keep_and_drop_reject_non_numeric():
    with pytest.raises(TypeError, match="boolean or numeric"):
        masks.keep(np.array(["a", "b"]))


@pytest.mark.parametrize("other", [np.ones((4, 4), bool), [[True, False]], np.zeros(4)])
def test_strategy_and_array_says_to_wrap_the_array(other):
    for combine in (lambda: fm.masks.causal() & other, lambda: other & fm.masks.causal()):
        with pytest.raises(TypeError, match=r"masks\.keep\(a\).*masks\.drop\(a\)"):
            combine()
    both = fm.masks.causal() & fm.masks.keep(np.ones((4, 4), bool))
    np.testing.assert_array_equal(both.to_dense((4, 4)), np.tril(np.ones((4, 4), bool)))


def test_out_aliasing_an_operand_is_a_value_error_on_every_backend(backend):
    """Checked before any kernel runs: cython raised BackendError and numba returned
    wrong values when out was the bias, or shared the mask's memory."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8))
    bias = rng.standard_normal((4, 8))
    with pytest.raises(ValueError, match="out shares memory with the bias"):
        fm.masked_softmax(x, bias=bias, out=bias, backend=backend)
    with pytest.raises(ValueError, match="out shares memory with the bias"):
        fm.masked_softmax(x, bias=bias[0], out=bias, backend=backend)  # broadcast bias row
    raw = np.ones(4 * 8 * 8, np.uint8)
    keep = raw.view(bool).reshape(4, 64)[:, :8]
    out = raw.view(np.float64).reshape(4, 8)  # the same bytes as the keep mask
    with pytest.raises(ValueError, match="out shares memory with the mask"):
        fm.masked_softmax(x, masks.keep(keep), out=out, backend=backend)
    overlapping = np.lib.stride_tricks.as_strided(np.zeros(40), (4, 8), (8 * 4, 8))
    with pytest.raises(ValueError, match="out has elements that share memory"):
        fm.masked_softmax(x, out=overlapping, backend=backend)
    y = fm.masked_softmax(x, bias=bias, out=np.empty_like(x), backend=backend)  # fine
    np.testing.assert_allclose(y, fm.masked_softmax(x, bias=bias, backend="numpy"))


def test_uint64_values_beyond_int64_never_wrap(backend):
    """Regression: lengths >= 2**63 wrapped negative and gave wrong masks silently."""
    big = np.array([2**63, 1], np.uint64)
    with pytest.raises(ValueError, match=r"padding lengths above .*2\*\*63"):
        masks.padding(big)
    with pytest.raises(ValueError, match=r"segments q_ids above .*renumber"):
        masks.segments(big)
    x = np.zeros((2, 1, 4))
    y = fm.masked_softmax(x, masks.prefix_lm(big), backend=backend)  # past the row: all kept
    np.testing.assert_allclose(y, [[[0.25] * 4], [[1.0, 0, 0, 0]]])
