"""Every backend, the same cases, against the NumPy reference (float64)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import DTYPES, assert_matches_reference, logits

import fastmask as fm
from fastmask import masks

ROW_LENGTHS = [*range(1, 18), 31, 64, 1000, 100_003]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_row_lengths_with_dense_mask(backend, dtype, n, rng):
    rows = 2 if n > 10_000 else 5
    x = logits(rng, (rows, n), dtype)
    keep = rng.random((rows, n)) < 0.7
    keep[-1] = False  # a fully masked row
    y = fm.masked_softmax(x, keep, backend=backend)
    assert_matches_reference(y, x, keep)
    assert np.all(y[-1] == 0)
    sums = y.astype(np.float64).sum(-1)[keep.any(-1)]
    np.testing.assert_allclose(sums, 1, atol=5e-3 if np.dtype(dtype).itemsize == 2 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 64, 1000])
def test_no_mask(backend, dtype, n, rng):
    x = logits(rng, (3, 4, n), dtype)
    assert_matches_reference(fm.masked_softmax(x, backend=backend), x)


SHAPES = [(9,), (4, 9), (3, 4, 9), (2, 3, 4, 9), (2, 2, 3, 4, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_axis_with_broadcast_mask_and_bias(backend, shape, dtype, rng):
    x = logits(rng, shape, dtype)
    for axis in range(-len(shape), len(shape)):
        # Masks and biases with size-1 axes (broadcast), different on each axis.
        mshape = tuple(d if i % 2 == 0 else 1 for i, d in enumerate(shape))
        bshape = tuple(1 if i % 2 == 0 else d for i, d in enumerate(shape))
        keep = rng.random(mshape) < 0.8
        bias = rng.standard_normal(bshape).astype(dtype)
        y = fm.masked_softmax(x, keep, bias=bias, axis=axis, backend=backend)
        assert_matches_reference(y, x, keep, bias, axis=axis)


def test_lower_rank_mask_and_bias_broadcast(backend, rng):
    x = logits(rng, (2, 3, 5, 7))
    keep = rng.random(7) < 0.6
    bias = rng.standard_normal((5, 7)).astype(np.float32)
    y = fm.masked_softmax(x, keep, bias=bias, backend=backend)
    assert_matches_reference(y, x, keep, bias)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::2],
        lambda a: a[..., ::-1],
        lambda a: a[:, ::-1, ::-2],
        lambda a: a.transpose(1, 0, 2),
        lambda a: np.asfortranarray(a),
        lambda a: a[..., 1:-1:3],
    ],
    ids=["step", "reversed-rows", "negative-strides", "transposed", "fortran", "strided-rows"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(backend, view, dtype, rng):
    base = logits(rng, (6, 5, 40), dtype)
    x = view(base)
    keep = view(rng.random(base.shape) < 0.7)
    bias = view(rng.standard_normal(base.shape).astype(dtype))
    for axis in (-1, 0):
        y = fm.masked_softmax(x, keep, bias=bias, axis=axis, backend=backend)
        assert_matches_reference(y, x, keep, bias, axis=axis)
        assert y.flags.c_contiguous


def test_unfoldable_middle_axes_are_split(backend, rng):
    # The mask broadcasts along axis 1 but not axis 2: the head axes cannot be
    # folded into one as a view, so the call is split and nothing is expanded.
    x = logits(rng, (2, 3, 4, 5, 6))
    keep = rng.random((2, 1, 4, 5, 6)) < 0.7
    y = fm.masked_softmax(x, keep, backend=backend)
    assert_matches_reference(y, x, keep)
    x2 = logits(rng, (2, 4, 3, 5, 6)).transpose(0, 2, 1, 3, 4)
    y2 = fm.masked_softmax(x2, masks.causal() & masks.padding([6, 3]), backend=backend)
    assert_matches_reference(y2, x2, (masks.causal() & masks.padding([6, 3])).to_dense(x2.shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place(backend, dtype, rng):
    x = logits(rng, (3, 4, 33), dtype)
    keep = rng.random((3, 1, 33)) < 0.6
    expected = x.copy()
    y = fm.masked_softmax(x, keep, out=x, backend=backend)
    assert y is x
    assert_matches_reference(x, expected, keep)
    # In place on a strided view of a larger buffer.
    base = logits(rng, (4, 50), dtype)
    v = base[::2, ::-2]
    orig = v.copy()
    fm.masked_softmax(v, out=v, backend=backend)
    assert_matches_reference(v, orig)


def test_out_separate_array(backend, rng):
    x = logits(rng, (3, 17))
    out = np.full_like(x, 7.0)
    y = fm.masked_softmax(x, out=out, backend=backend)
    assert y is out
    assert_matches_reference(out, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_rows(backend, dtype):
    inf, nan = np.inf, np.nan
    x = np.array(
        [
            [1.0, 2.0, 3.0, 4.0],  # ordinary
            [-inf, -inf, -inf, -inf],  # all logits -inf -> zeros
            [1.0, nan, 3.0, 4.0],  # NaN kept -> NaN row
            [1.0, inf, 3.0, 4.0],  # +inf kept -> NaN row (as NumPy)
            [-inf, 2.0, -inf, -inf],  # one finite -> one-hot
            [5.0, 5.0, 5.0, 5.0],  # all masked below -> zeros
            [nan, 1.0, 2.0, 3.0],  # NaN at a masked position -> ignored
            [-inf, nan, -inf, -inf],  # only -inf and NaN kept -> NaN row
            [1e4, -1e4, 0.0, 3e4 if dtype != np.float16 else 6e4],  # huge spread
        ],
        dtype=dtype,
    )
    keep = np.ones(x.shape, bool)
    keep[5] = False
    keep[6, 0] = False
    y = fm.masked_softmax(x, keep, backend=backend)
    assert_matches_reference(y, x, keep)
    assert np.all(y[1] == 0) and np.all(y[5] == 0)
    assert np.all(np.isnan(y[2])) and np.all(np.isnan(y[3])) and np.all(np.isnan(y[7]))
    assert y[4].tolist() == [0, 1, 0, 0]
    assert not np.isnan(y[6]).any() and y[6, 0] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_bias_gives_exact_zeros(backend, dtype, rng):
    x = logits(rng, (4, 6, 50), dtype)
    bias = np.where(rng.random((4, 1, 50)) < 0.4, -np.inf, 0.0).astype(dtype)
    bias[0] = -np.inf  # fully masked through the bias alone
    y = fm.masked_softmax(x, bias=bias, backend=backend)
    assert_matches_reference(y, x, bias=bias)
    assert np.all(y[np.broadcast_to(bias == -np.inf, y.shape)] == 0)
    assert np.all(y[0] == 0)


@pytest.mark.parametrize("scale", [0.125, 2.0, -1.0, 0.0, 1e-30])
def test_scale(backend, scale, rng):
    x = logits(rng, (3, 5, 20))
    keep = rng.random((3, 5, 20)) < 0.5
    bias = rng.standard_normal((20,)).astype(np.float32)
    y = fm.masked_softmax(x, keep, bias=bias, scale=scale, backend=backend)
    assert_matches_reference(y, x, keep, bias, scale)


STRATEGIES = {
    "padding-right": lambda: masks.padding([5, 0, 17]),
    "padding-left": lambda: masks.padding([5, 17, 1], side="left"),
    "causal": lambda: masks.causal(),
    "causal+2": lambda: masks.causal(2),
    "causal-3": lambda: masks.causal(-3),
    "causal-far": lambda: masks.causal(10**30),
    "causal-bottom-right": lambda: masks.causal(align="bottom-right"),
    "causal&padding": lambda: masks.causal() & masks.padding([3, 17, 9]),
    "causal&padding-left": lambda: (
        masks.causal(align="bottom-right") & masks.padding([3, 17, 9], side="left")
    ),
    "keep": lambda: masks.keep(np.arange(17) % 3 != 0),
    "drop": lambda: masks.drop((np.arange(17) % 4 == 0).astype(np.float32)),
    "drop&causal&padding": lambda: (
        masks.drop(np.arange(17) == 2) & masks.causal() & masks.padding([3, 17, 9])
    ),
    "window4": lambda: masks.sliding_window(4),
    "band3": lambda: masks.sliding_window(3, causal=False),
    "window-bottom-right": lambda: masks.sliding_window(5, align="bottom-right"),
    "window&padding": lambda: masks.sliding_window(6) & masks.padding([2, 17, 11]),
    "prefix_lm": lambda: masks.prefix_lm([0, 5, 17]),
    "prefix_lm-scalar": lambda: masks.prefix_lm(3),
    "segments-packed": lambda: masks.segments(
        np.repeat([0, 1, 2], [4, 4, 3]), np.repeat([0, 1, 2], [6, 6, 5])
    ),
    "segments-packed&causal": lambda: (
        masks.segments(np.repeat([3, 1], [5, 6]), np.repeat([3, 1], [8, 9])) & masks.causal()
    ),
    "segments-per-batch": lambda: masks.segments(
        np.array([[0] * 11, [1] * 5 + [2] * 6, [7] * 11]),
        np.array([[0] * 17, [1] * 9 + [2] * 8, [5] * 17]),
    ),
    "segments-scattered": lambda: masks.segments(np.arange(11) % 3, np.arange(17) % 3),
    "keep&keep": lambda: (
        masks.keep(np.arange(17) % 2 == 0) & masks.keep(np.arange(11)[:, None] % 3 != 0)
    ),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 11, 17), (3, 2, 11, 17)], ids=["3d", "4d"])
def test_strategies_match_their_dense_form(backend, name, dtype, shape, rng):
    strategy = STRATEGIES[name]()
    x = logits(rng, shape, dtype)
    y = fm.masked_softmax(x, strategy, backend=backend)
    assert_matches_reference(y, x, strategy.to_dense(shape))


@pytest.mark.parametrize("lq,lk", [(1, 9), (4, 9), (9, 4)])
def test_causal_bottom_right_for_kv_cache(backend, lq, lk, rng):
    x = logits(rng, (2, 3, lq, lk))
    strategy = masks.causal(align="bottom-right")
    dense = strategy.to_dense(x.shape)
    # The last query always sees the last key; with Lq=1 it sees every key.
    assert dense[..., -1, -1].all()
    y = fm.masked_softmax(x, strategy, backend=backend)
    assert_matches_reference(y, x, dense)


def test_strategy_with_bias_and_scale(backend, rng):
    x = logits(rng, (2, 4, 8, 8), np.float64)
    bias = rng.standard_normal((1, 4, 8, 8))
    strategy = masks.causal() & masks.padding([8, 5])
    y = fm.masked_softmax(x, strategy, bias=bias, scale=0.3, backend=backend)
    assert_matches_reference(y, x, strategy.to_dense(x.shape), bias, 0.3)


def test_strategy_with_1d_and_2d_logits(backend, rng):
    x1 = logits(rng, (10,))
    assert_matches_reference(
        fm.masked_softmax(x1, masks.padding(4), backend=backend), x1, np.arange(10) < 4
    )
    x2 = logits(rng, (6, 6))
    y2 = fm.masked_softmax(x2, masks.causal(), backend=backend)
    assert_matches_reference(y2, x2, np.tril(np.ones((6, 6), bool)))


def test_byte_swapped_input(backend, rng):
    x = logits(rng, (3, 9)).astype(">f4")
    y = fm.masked_softmax(x, backend=backend)
    assert y.dtype == np.float32
    assert_matches_reference(y, x)


def test_empty_inputs(backend):
    for shape in [(0, 5), (3, 0), (2, 0, 4), (0,)]:
        x = np.zeros(shape, np.float32)
        y = fm.masked_softmax(x, backend=backend)
        assert y.shape == shape and y.dtype == np.float32
    y = fm.masked_softmax(np.zeros((0, 3, 4, 5), np.float32), masks.causal(), backend=backend)
    assert y.shape == (0, 3, 4, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_are_not_modified(backend, dtype, rng):
    x = logits(rng, (2, 3, 4, 10), dtype)
    keep = rng.random((2, 1, 1, 10)) < 0.5
    bias = rng.standard_normal((1, 3, 1, 10)).astype(dtype)
    copies = [a.copy() for a in (x, keep, bias)]
    fm.masked_softmax(x, keep, bias=bias, scale=0.5, backend=backend)
    for a, c in zip((x, keep, bias), copies, strict=True):
        np.testing.assert_array_equal(a, c)


def test_readonly_input(backend, rng):
    x = logits(rng, (3, 12))
    x.flags.writeable = False
    assert_matches_reference(fm.masked_softmax(x, backend=backend), x)
    xb = np.broadcast_to(logits(rng, (1, 12)), (4, 12))  # zero-stride rows
    assert_matches_reference(fm.masked_softmax(xb, backend=backend), xb)


def test_torch_tensors_zero_copy(backend, rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(logits(rng, (2, 3, 4, 8)))
    keep = torch.rand(2, 1, 1, 8) < 0.7
    y = fm.masked_softmax(x, keep, backend=backend)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert_matches_reference(y.numpy(), x.numpy(), keep.numpy())
    # In place into the tensor's own memory.
    fm.masked_softmax(x, keep, out=x, backend=backend)
    np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_unaligned_input_and_bias(backend, rng):
    buf = np.zeros(4 * 3 * 17 + 1, np.uint8)
    x = np.frombuffer(buf.data, np.float32, count=3 * 17, offset=1).reshape(3, 17)
    assert not x.flags.aligned
    bias = np.frombuffer(buf.data, np.float32, count=17, offset=1)
    y = fm.masked_softmax(x, bias=bias, backend=backend)
    assert_matches_reference(y, x, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 17, 300])  # short rows, vector rows with a tail
@pytest.mark.parametrize("scale", [None, 0.5, 1 / np.sqrt(96), 1e-30])
@pytest.mark.parametrize("peak", [2e2, 1e5, 1e9, 1e20, 1e38])
def test_finite_logits_of_any_magnitude_give_finite_weights(backend, dtype, n, scale, peak):
    """Regression: x = [0, ..., 1e20] with scale 1/sqrt(96) was a NaN row (cython,
    float64) or a ZeroDivisionError (numba): x*scale - max fused into one rounding
    is off by the max's own rounding error, ~1e12 there, beyond exp's range."""
    if peak > float(ml_dtypes.finfo(dtype).max):
        pytest.skip("not finite in this dtype")
    x = np.zeros((3, n))
    x[0, -1] = peak
    x[1, 0] = peak
    x[2, :] = peak * np.linspace(0.5, 1.0, n)  # every kept logit large
    x = x.astype(dtype)
    for mask in (None, masks.padding(np.array([max(n - 1, 1)]))):
        y = fm.masked_softmax(x, mask, scale=scale, backend=backend)
        assert np.isfinite(y).all()
        keep = None if mask is None else mask.to_dense(x.shape)
        assert_matches_reference(y, x, keep=keep, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 17, 300])
@pytest.mark.parametrize("offset", [-1e9, -1e6, -1e3, 1e3, 1e9])
def test_a_bias_shared_by_the_whole_row_is_not_rounded_away(backend, dtype, n, offset):
    """Regression: TensorFlow masks a padding row with -1e9 on every key; in float32,
    x + bias rounded first made such rows uniform (the float64 reference: softmax(x))."""
    if abs(offset) > float(ml_dtypes.finfo(dtype).max):
        pytest.skip("not finite in this dtype")
    if dtype == np.float64 and abs(offset) > 1e3:
        # The float64 reference rounds x + bias itself (|offset| * 2**-53 per logit):
        # beyond this it is no oracle at float64's 1e-12 tolerance.
        pytest.skip("the float64 reference's own rounding exceeds its tolerance")
    rng = np.random.default_rng(17)
    x = logits(rng, (4, n), dtype)
    bias = np.full((4, n), offset, dtype)
    bias[1] = 0  # rows without the offset alongside
    keep = rng.random((4, n)) < 0.7
    keep[:, 0] = True
    for k in (None, keep):
        y = fm.masked_softmax(x, k, bias=bias, backend=backend)
        assert_matches_reference(y, x, keep=k, bias=bias)


# (float64 is left out: its reference rounds z itself, beyond float64's 1e-12 tolerance)
@pytest.mark.parametrize(
    "dtype,peak,scale", [(np.float32, 1e20, 1e-12), (np.float32, 1e20, 3e-13),
                         (np.float32, 3e38, 1e-31)],
)  # fmt: skip
@pytest.mark.parametrize("n", [3, 17, 90])
def test_near_ties_at_a_huge_magnitude_keep_their_weights(backend, dtype, peak, scale, n):
    """Logits a few ulps apart at 1e20, scaled down to |z| ~ 1e8: rounding z in float32
    made their weights wrong by up to 40%; the float64 reference keeps them."""
    up = np.asarray(peak, dtype)
    steps = [up]
    for _ in range(2):
        steps.append(np.nextafter(steps[-1], dtype(np.inf)))
    x = np.array([steps * (n // 3)], dtype)
    y = fm.masked_softmax(x, scale=scale, backend=backend)
    assert_matches_reference(y, x, scale=scale)


@pytest.mark.parametrize("n", [4, 40, 300])
@pytest.mark.parametrize("how", ["none", "padding", "keep"])
def test_a_product_that_overflows_float32_is_not_a_nan_row(backend, n, how):
    """Regression: float32 logits of 3e38 with scale 2 overflowed x*scale to inf, and
    the compiled backends returned a NaN row; float64 (the reference) is finite."""
    x = np.zeros((1, 1, n), np.float32)
    x[..., 0], x[..., 1], x[..., 3] = 3e38, 2.9e38, -3e38
    keep = np.ones(n, bool)
    keep[0] = how != "keep"  # with a dense mask, key 0 is masked out: key 1 wins
    mask = {"none": None, "padding": masks.padding([n - 1]), "keep": keep}[how]
    y = fm.masked_softmax(x, mask, scale=2.0, backend=backend)
    assert np.isfinite(y).all()
    dense = None if mask is None else np.broadcast_to(
        keep if how == "keep" else np.arange(n) < n - 1, x.shape
    )  # fmt: skip
    assert_matches_reference(y, x, keep=dense, scale=2.0)
    x[..., 2] = np.inf  # a kept +inf logit itself: the row is NaN, as documented
    assert np.isnan(fm.masked_softmax(x, mask, scale=2.0, backend=backend)).all()
