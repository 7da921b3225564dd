"""The Numba kernel (fastmask/kernels/numba_softmax.py) against the NumPy reference.

Covers: the restricted fast-math flags keep ``-inf``/NaN semantics; the
vectorisable ``exp`` and the float16 conversions are accurate (every half
value, both ways); the kernel equals ``masked_softmax_reference`` for each
dtype (bfloat16 included: its conversions are in ``test_numba_bfloat16.py``),
mask kind and memory layout, serial and parallel, in place and not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastmask.kernels import numba_exp as ne
from fastmask.kernels import numba_softmax as ns
from fastmask.reference import masked_softmax_reference

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
COMPUTE = {
    np.float16: np.float32,
    ml_dtypes.bfloat16: np.float32,
    np.float32: np.float32,
    np.float64: np.float64,
}
FORBIDDEN_FLAGS = {"nnan", "ninf", "fast"}


# --------------------------------------------------------------------------
# helpers


def compute_dtype(dt):
    return COMPUTE[np.dtype(dt).type]


def run(x, *, out=None, scale=1.0, keep=None, bias=None, bounds=None, nthreads=1):
    """Call the kernel the way the backend does; returns ``out``."""
    if out is None:
        out = np.empty(x.shape, x.dtype)
    shape = x.shape
    keep4 = None if keep is None else np.broadcast_to(keep, shape)
    bias4 = None if bias is None else np.broadcast_to(bias, shape)
    bounds4 = None if bounds is None else np.broadcast_to(bounds, (*shape[:3], 2))
    ns.masked_softmax_4d(x, out, scale, keep4, bias4, bounds4, 0, nthreads)
    return out


def effective_keep(shape, keep=None, bounds=None):
    """keep & (lo <= k < hi), materialised, for the reference."""
    k = np.ones(shape, bool) if keep is None else np.broadcast_to(keep, shape).copy()
    if bounds is not None:
        b = np.broadcast_to(bounds, (*shape[:3], 2))
        idx = np.arange(shape[3])
        k &= (idx >= b[..., :1]) & (idx < b[..., 1:])
    return k


def assert_within_one_bf16_ulp(y, ref):
    """bfloat16 ``y`` is ``ref`` (float64, >= 0) rounded to bfloat16, or a neighbour of that.

    Below float32's smallest normal (bfloat16 has float32's range) the kernel's
    float32 ``exp`` is flushed to 0, so there only an absolute error of 2**-126
    counts.
    """
    assert not np.any(np.signbit(y)), "weights are never negative (nor -0)"
    ulps = np.abs(y.view(np.int16).astype(np.int32) - ref.astype(BF16).view(np.int16))
    tiny = np.abs(y.astype(np.float64) - ref) <= np.finfo(np.float32).tiny
    bad = (ulps > 1) & ~tiny
    assert not bad.any(), (y[bad][:5], ref[bad][:5], ulps.max())


def check(y, x, *, scale=1.0, keep=None, bias=None, bounds=None):
    """``y`` equals the float64 reference within the dtype's accuracy; masked entries are 0."""
    keep_eff = effective_keep(x.shape, keep, bounds)
    with np.errstate(invalid="ignore"):  # inf - inf in NaN rows
        ref = masked_softmax_reference(x, keep_eff, bias, scale)
    y64 = y.astype(np.float64)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(np.isnan(y64), np.isnan(ref), err_msg="NaN rows differ")
    ok = ~np.isnan(ref)
    if x.dtype == np.float16:
        # within one float16 ulp of the float64 result (rounding of a float32 value)
        ulp = np.spacing(np.abs(ref[ok]).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(y64[ok] - ref[ok]) <= ulp), np.max(np.abs(y64[ok] - ref[ok]) / ulp)
    elif x.dtype == BF16:
        assert_within_one_bf16_ulp(y[ok], ref[ok])
    elif x.dtype == np.float32:
        np.testing.assert_allclose(y64[ok], ref[ok], atol=1e-6, rtol=1e-5)
    else:
        np.testing.assert_allclose(y64[ok], ref[ok], atol=1e-12, rtol=1e-12)
    masked = ~keep_eff & ok
    assert np.all(y64[masked] == 0), "masked positions must be exactly 0"


def logits(rng, shape, dtype, spread=4.0):
    return (rng.standard_normal(shape) * spread).astype(dtype)


@pytest.fixture(params=[False, True], ids=["cached-stores", "streaming-stores"])
def stream(request, monkeypatch):
    """Run a test twice: plain stores, and non-temporal stores (normally only for big outputs)."""
    if request.param:
        monkeypatch.setattr(ns, "STREAM_MIN_BYTES", 0)
    return request.param


# --------------------------------------------------------------------------
# fast-math flags


def test_flag_sets_exclude_nnan_ninf():
    for flags in (ns.LOOP_FASTMATH, ne.EXP_FASTMATH, ne.HALF_FASTMATH):
        assert isinstance(flags, frozenset)
        assert not (flags & FORBIDDEN_FLAGS)
    # the magic-number rounding in exp must not be reassociated away
    assert "reassoc" not in ne.EXP_FASTMATH
    assert "reassoc" in ns.LOOP_FASTMATH  # lets the sum vectorise


def test_compiled_dispatchers_use_those_flags():
    ns.compile(np.float32)
    dispatchers = [ns._kernels[("float32", False)], ns._kernels[("float32", True)]]
    dispatchers += [getattr(ns, name) for name in ns._JIT_LOOP if name not in ns._STRICT]
    for d in dispatchers:
        fm = d.targetoptions["fastmath"]
        assert fm is not True
        assert set(fm) == set(ns.LOOP_FASTMATH), d
    for name in ns._STRICT:  # the float64 staging rounds as written: no flags at all
        assert not getattr(ns, name).targetoptions.get("fastmath")
    for d in (ne.exp_f32, ne.exp_f64):
        fm = d.targetoptions["fastmath"]
        assert fm is not True and set(fm) == set(ne.EXP_FASTMATH)
    for d in (ne.half_to_f32_soft, ne.f32_to_half_soft):
        assert not d.targetoptions.get("fastmath")


def test_generated_ir_has_no_nnan_ninf_and_is_vectorised():
    """Compile the serial float32 kernel afresh (no cache) and read its LLVM IR."""
    import numba

    ns._install()
    k = numba.njit(ns._signature(np.dtype(np.float32)), fastmath=set(ns.LOOP_FASTMATH))(
        ns._kernel_functions("ir-test")[0]
    )
    ir = "\n".join(k.inspect_llvm().values())
    for flag in ("nnan", "ninf", " fast "):
        assert flag not in ir, flag
    assert "llvm.maximum" in ir  # the NaN-propagating max reduction
    # loop vectoriser output: vector float types (any width the target picks)
    assert "x float>" in ir


def test_exp_of_minus_inf_is_exactly_zero_and_nan_propagates():
    import numba

    @numba.njit
    def both(a32, a64, o32, o64):
        for i in range(a32.size):
            o32[i] = ne.exp_f32(a32[i])
            o64[i] = ne.exp_f64(a64[i])

    ns._install()
    z = np.array([-np.inf, np.nan, 0.0, -0.0, -1e30, -1000.0, -1.0], np.float64)
    o32 = np.empty(z.size, np.float32)
    o64 = np.empty(z.size, np.float64)
    both(z.astype(np.float32), z, o32, o64)
    for o in (o32, o64):
        assert o[0] == 0.0 and not np.signbit(o[0])
        assert np.isnan(o[1])
        assert o[2] == 1.0 and o[3] == 1.0
        assert o[4] == 0.0 and o[5] == 0.0
    assert o64[6] == pytest.approx(np.exp(-1.0), rel=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_minus_inf_bias_gives_exact_zeros(dtype, nthreads):
    rng = np.random.default_rng(1)
    x = logits(rng, (2, 3, 5, 40), dtype, spread=1.0)  # no float16 underflow
    bias = np.zeros((2, 1, 1, 40), compute_dtype(dtype))
    bias[0, ..., 5:17] = -np.inf
    bias[1, ..., ::3] = -np.inf
    y = run(x, bias=bias, nthreads=nthreads)
    full = np.broadcast_to(bias, x.shape)
    assert np.all(y[full == -np.inf] == 0)
    assert np.all(y[full == 0] > 0)
    check(y, x, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_edge_rows(dtype, nthreads, stream):
    """Fully masked, all -inf, NaN kept or masked, +inf kept, empty bounds."""
    n = 23
    cdt = compute_dtype(dtype)
    x = np.linspace(-3, 3, 10 * n).reshape(1, 1, 10, n).astype(dtype)
    keep = np.ones((1, 1, 10, n), bool)
    bias = np.zeros((1, 1, 10, n), cdt)
    bounds = np.tile(np.array([0, n], np.int64), (1, 1, 10, 1))
    keep[0, 0, 0] = False  # 0: nothing kept -> zeros
    x[0, 0, 1] = -np.inf  # 1: all -inf -> zeros
    x[0, 0, 2, 4] = np.nan  # 2: kept NaN -> NaN row
    x[0, 0, 3, 4] = np.nan  # 3: masked NaN -> ignored
    keep[0, 0, 3, 4] = False
    x[0, 0, 4, 7] = np.inf  # 4: kept +inf -> NaN row
    bias[0, 0, 5] = -np.inf  # 5: -inf everywhere but a NaN -> NaN row
    bias[0, 0, 5, 2] = np.nan
    bounds[0, 0, 6] = (9, 9)  # 6: empty bounds -> zeros
    bounds[0, 0, 7] = (-50, 3)  # 7: clipped bounds
    bounds[0, 0, 8] = (20, 400)
    x[0, 0, 8, :20] = np.nan  # 8: NaN outside the bounds is never read
    x[0, 0, 9, 3] = np.inf  # 9: +inf plus -inf bias -> NaN row
    bias[0, 0, 9, 3] = -np.inf
    y = run(x, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
    check(y, x, keep=keep, bias=bias, bounds=bounds)
    assert np.all(y[0, 0, [0, 1, 6]] == 0)
    assert np.all(np.isnan(y[0, 0, [2, 4, 5, 9]]))
    assert not np.any(np.isnan(y[0, 0, [3, 7, 8]]))
    assert np.all(y[0, 0, 7, 3:] == 0) and np.all(y[0, 0, 8, :20] == 0)
    np.testing.assert_allclose(y[0, 0, [3, 7, 8]].astype(np.float64).sum(-1), 1, rtol=5e-3)


# --------------------------------------------------------------------------
# exp accuracy


@pytest.fixture(scope="module")
def vexp():
    import numba

    ns._install()

    @numba.njit(fastmath=set(ns.LOOP_FASTMATH))
    def exp32(z, o):
        for i in range(z.size):
            o[i] = ne.exp_f32(z[i])

    @numba.njit(fastmath=set(ns.LOOP_FASTMATH))
    def exp64(z, o):
        for i in range(z.size):
            o[i] = ne.exp_f64(z[i])

    return exp32, exp64


def test_exp_f64_accuracy(vexp):
    z = np.linspace(-800.0, 0.0, 4_000_001)
    o = np.empty_like(z)
    vexp[1](z, o)
    ref = np.exp(z)
    normal = z >= ne._F64_EXP_MIN
    assert np.all(ref[normal] >= np.finfo(np.float64).tiny)
    rel = np.abs(o[normal] - ref[normal]) / ref[normal]
    assert rel.max() <= 4 * np.finfo(np.float64).eps, rel.max()
    # below the smallest normal result: exactly zero (numpy gives subnormals)
    assert np.all(o[~normal] == 0)
    assert np.all(ref[~normal] < np.finfo(np.float64).tiny)


def test_exp_f32_accuracy(vexp):
    z = np.linspace(-90.0, 0.0, 4_000_001).astype(np.float32)
    o = np.empty_like(z)
    vexp[0](z, o)
    ref = np.exp(z.astype(np.float64))
    normal = z >= ne._F32_EXP_MIN
    ulp = np.spacing(ref[normal].astype(np.float32)).astype(np.float64)
    err = np.abs(o[normal] - ref[normal]) / ulp
    assert err.max() <= 2.0, err.max()
    assert np.all(o[~normal] == 0)
    assert np.all(ref[~normal] < np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------
# float16 conversions (all 65536 values, both ways; soft and hardware paths)


@pytest.fixture(scope="module")
def half_loops():
    import numba

    ns._install()

    def make(fn):
        @numba.njit
        def loop(a, o):
            for i in range(a.size):
                o[i] = fn(a[i])

        return loop

    loops = {"soft": (make(ne.half_to_f32_soft), make(ne.f32_to_half_soft))}
    if ne.HALF_HARDWARE:
        loops["hardware"] = (make(ne.half_to_f32), make(ne.f32_to_half))
    return loops


@pytest.mark.parametrize("impl", ["soft", "hardware"])
def test_half_to_float_all_values(half_loops, impl):
    if impl not in half_loops:
        pytest.skip("no half conversion instructions on this target")
    h2f, _ = half_loops[impl]
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    f = np.empty(65536, np.float32)
    h2f(h, f)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(f), nan)
    np.testing.assert_array_equal(f.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    if impl == "soft":  # payloads too
        np.testing.assert_array_equal(f.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("impl", ["soft", "hardware"])
def test_float_to_half_all_values_and_ties(half_loops, impl):
    if impl not in half_loops:
        pytest.skip("no half conversion instructions on this target")
    _, f2h = half_loops[impl]
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    as_f32 = halves.view(np.float16).astype(np.float32)
    # every half value (exact round trip), every midpoint between neighbours
    # (ties to even), and random float32 bit patterns
    finite = np.sort(as_f32[np.isfinite(as_f32)].astype(np.float64))
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
    rnd = np.random.default_rng(3).integers(0, 2**32, 2_000_000, dtype=np.uint64)
    rnd = rnd.astype(np.uint32).view(np.float32)
    specials = np.array([65504, 65519.99, 65520, 65536, 1e30, 2.0**-24, 2.0**-25, 2.0**-26,
                         3 * 2.0**-26, 6.1e-5, -0.0, np.inf, -np.inf], np.float32)  # fmt: skip
    values = np.concatenate([as_f32, mids, -mids, rnd, specials])
    out = np.empty(values.size, np.uint16)
    f2h(values, out)
    with np.errstate(over="ignore"):
        ref = values.astype(np.float16)
    nan = np.isnan(values)
    assert np.all(np.isnan(out.view(np.float16)[nan]))
    np.testing.assert_array_equal(out[~nan], ref.view(np.uint16)[~nan])
    np.testing.assert_array_equal(out[: halves.size][~np.isnan(as_f32)], halves[~np.isnan(as_f32)])


# --------------------------------------------------------------------------
# the kernel against the reference: dtypes x masks x layouts x threads


def _layout(base, kind, rng):
    """An array equal to ``base`` with the memory layout ``kind``."""
    if kind == "contiguous":
        return base.copy()
    if kind == "negative":
        flip = (slice(None, None, -1), slice(None), slice(None, None, -1), slice(None, None, -1))
        return np.ascontiguousarray(base[flip])[flip]
    if kind == "inner-strided":
        big = np.zeros((*base.shape[:-1], 3 * base.shape[-1]), base.dtype)
        big[..., ::3] = base
        return big[..., ::3]
    if kind == "transposed":
        return np.ascontiguousarray(base.swapaxes(2, 3)).swapaxes(2, 3)
    raise AssertionError(kind)


def _empty_out(x, kind):
    if kind == "inner-strided":
        return np.empty((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)[..., ::-2]
    if kind == "negative":
        return np.empty(x.shape, x.dtype)[::-1, ::-1]
    return np.empty(x.shape, x.dtype)


def _operands(rng, shape, dtype, masks, kind):
    B, H, Q, N = shape
    keep = bias = bounds = None
    if "keep" in masks:
        keep = rng.random((B, 1, Q, N)) < 0.7
        keep[0, 0, 0] = False  # one fully masked row
        if kind != "contiguous":
            keep = _layout(keep, "negative" if kind == "negative" else "inner-strided", rng)
    if "bias" in masks:
        bias = rng.standard_normal((1, H, 1, N)).astype(compute_dtype(dtype))
        bias[..., ::4] = -np.inf
        if kind == "inner-strided":
            bias = _layout(bias, "inner-strided", rng)
        elif kind == "transposed":  # a full-size bias, non-unit inner stride
            bias = _layout(np.broadcast_to(bias, shape).copy(), "transposed", rng)
    if "bounds" in masks:
        bnd = np.empty((B, H, Q, 2), np.int64)
        bnd[..., 0] = rng.integers(-3, N // 2 + 2, (B, H, Q))
        bnd[..., 1] = rng.integers(N // 3, N + 4, (B, H, Q))
        if kind == "negative":  # stored as (hi, lo), read through a reversed last axis
            bnd = np.ascontiguousarray(bnd[..., ::-1])[..., ::-1]
        elif kind != "contiguous":  # broadcast over heads
            bnd = np.broadcast_to(bnd[:, :1], (B, H, Q, 2))
        bounds = bnd
    return keep, bias, bounds


MASKS = [(), ("keep",), ("bias",), ("bounds",), ("keep", "bias", "bounds")]
LAYOUTS = ["contiguous", "negative", "inner-strided", "transposed"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", MASKS, ids=lambda m: "+".join(m) or "none")
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_kernel_matches_reference(dtype, masks, kind, nthreads, stream):
    rng = np.random.default_rng(zlib.crc32(repr((dtype, masks, kind)).encode()))
    shape = (2, 3, 4, 37)
    x = _layout(logits(rng, shape, dtype), kind, rng)
    keep, bias, bounds = _operands(rng, shape, dtype, masks, kind)
    x.flags.writeable = False
    out = _empty_out(x, kind)
    y = run(x, out=out, scale=0.7, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
    check(y, x, scale=0.7, keep=keep, bias=bias, bounds=bounds)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "inner-strided", "negative"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_in_place(dtype, kind, nthreads, stream):
    rng = np.random.default_rng(7)
    shape = (2, 2, 5, 70)
    base = logits(rng, shape, dtype)
    keep, bias, bounds = _operands(rng, shape, dtype, ("keep", "bias", "bounds"), "contiguous")
    x = _layout(base, kind, rng)
    y = run(x, out=x, scale=1.3, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
    assert y is x
    check(x, base, scale=1.3, keep=keep, bias=bias, bounds=bounds)


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_zero_stride_x(dtype):
    """x itself a broadcast view (0 strides on B and Q), read-only."""
    rng = np.random.default_rng(11)
    row = logits(rng, (1, 3, 1, 50), dtype)
    x = np.broadcast_to(row, (4, 3, 6, 50))
    keep = rng.random((4, 1, 1, 50)) < 0.5
    for nthreads in (1, 2):
        y = run(x, scale=2.0, keep=keep, nthreads=nthreads)
        check(y, x, scale=2.0, keep=keep)
    # operands broadcast from scalars: every stride 0
    bias = np.broadcast_to(np.array(-1.5, compute_dtype(dtype)), x.shape)
    bounds = np.broadcast_to(np.array([3, 40], np.int64), (4, 3, 6, 2))
    for flag in (True, False):
        keep = np.broadcast_to(np.array(flag), x.shape)
        y = run(x, keep=keep, bias=bias, bounds=bounds, nthreads=2)
        check(y, x, keep=keep, bias=bias, bounds=bounds)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_row_lengths(dtype, nthreads, stream):
    """Every short length (vector tails), and long rows (several sum blocks)."""
    rng = np.random.default_rng(5)
    for n in [*range(1, 18), 31, 64, 1000, 100_003]:
        rows = 3 if n > 1000 else 5
        shape = (1, 1, rows, n)
        x = logits(rng, shape, dtype)
        keep, bias, bounds = _operands(rng, shape, dtype, ("keep", "bias", "bounds"), "contiguous")
        y = run(x, scale=0.5, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
        check(y, x, scale=0.5, keep=keep, bias=bias, bounds=bounds)
        y = run(x, scale=0.5, nthreads=nthreads)
        check(y, x, scale=0.5)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_products_that_overflow_to_minus_inf(dtype, nthreads):
    """Regression: finite logits whose float32 products all overflow to -inf (-3e38 with
    scale 2) made a zero row, as if nothing were kept; the float64 products are finite."""
    x = np.full((1, 1, 4, 5), -3e38).astype(dtype)
    x[0, 0, 1, 2] = -1e38  # the largest: its weight is 1
    x[0, 0, 2] = -np.inf  # no finite logit: zeros
    x[0, 0, 3, 1:] = -np.inf  # one finite logit: 1
    keep = np.ones(x.shape, bool)
    keep[0, 0, 0, 3] = False
    y = run(x, scale=2.0, keep=keep, nthreads=nthreads)
    check(y, x, scale=2.0, keep=keep)
    np.testing.assert_array_equal(y[0, 0, 1], [0, 0, 1, 0, 0])
    assert np.all(y[0, 0, 2] == 0) and y[0, 0, 3, 0] == 1


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_large_bias_cancelling_large_logits_never_raises(dtype, inplace):
    """Regression: x*scale ~ 1e10 cancelled by a bias ~ -1e10 (ulp 1024 in float32):
    pass 2 rounded ``x*scale + b - m`` unlike pass 1, its sum was 0 and the kernel
    raised ZeroDivisionError (or gave NaN). Such rows are staged in float64 where
    ``x`` is still there (out of place, and always for 16-bit logits)."""
    s = 0.10206207261596577
    x = np.array([[9.71736e10, 9.71e10, 9.7e10], [-2.67109e22, 0.0, 1.0]])
    bias = np.stack([-x[0] * s, -x[1] * s + [5.0, 0.0, -2.0]]).astype(np.float32)
    x = x.astype(dtype).reshape(1, 1, 2, 3)
    bias = bias.reshape(x.shape)
    xin = x.copy()
    y = run(xin, out=xin if inplace else None, scale=s, bias=bias)
    if inplace and dtype == np.float32:  # x overwritten by pass 2: not recomputed
        assert np.all(np.isnan(y) | np.isfinite(y))
    else:
        check(y, x, scale=s, bias=bias)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_a_row_whose_bias_is_a_large_shared_offset(dtype):
    """TensorFlow's -1e9 on every key of a padding row: |max| >= 2**24, staged in float64,
    so the weights are softmax(x * scale) of the row."""
    rng = np.random.default_rng(12)
    x = logits(rng, (2, 1, 3, 21), dtype)
    bias = np.zeros(x.shape, np.float32)
    bias[0, 0, 1] = -1e9
    bias[1, 0, 2] = 6e8  # (offsets up to 2**30: beyond, the float64 reference rounds them)
    y = run(x, scale=0.3, bias=bias, nthreads=2)
    check(y, x, scale=0.3, bias=bias)
    check(y[:1, :, 1:2], x[:1, :, 1:2], scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_stores_any_alignment(dtype, monkeypatch):
    """Non-temporal line stores with the output starting anywhere within a cache line."""
    monkeypatch.setattr(ns, "STREAM_MIN_BYTES", 0)
    rng = np.random.default_rng(9)
    shape = (2, 1, 6, 300)
    size = int(np.prod(shape))
    x = logits(rng, shape, dtype)
    bounds = np.array([[0, 300], [17, 250], [40, 41], [5, 5], [0, 16], [33, 300]], np.int64)
    bounds = bounds.reshape(1, 1, 6, 2)
    line = 64 // np.dtype(dtype).itemsize
    for start in range(line):
        out = np.full(size + line, 7, dtype)[start : start + size].reshape(shape)
        y = run(x, out=out, bounds=bounds, nthreads=2)
        check(y, x, bounds=bounds)


@pytest.mark.parametrize("nthreads", [2, 3, 64])
def test_more_threads_than_rows_and_uneven_chunks(nthreads):
    rng = np.random.default_rng(2)
    for shape in [(1, 1, 1, 9), (1, 1, 2, 9), (3, 1, 7, 33)]:
        x = logits(rng, shape, np.float32)
        check(run(x, nthreads=nthreads), x)


def test_input_not_modified_and_empty_shapes():
    rng = np.random.default_rng(4)
    x = logits(rng, (2, 2, 3, 10), np.float32)
    keep = rng.random((2, 1, 1, 10)) < 0.5
    x0, keep0 = x.copy(), keep.copy()
    run(x, keep=keep, nthreads=2)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(keep, keep0)
    for shape in [(0, 2, 3, 4), (2, 2, 3, 0)]:
        out = np.full(shape, 5.0, np.float32)
        run(np.zeros(shape, np.float32), out=out, nthreads=2)  # nothing to do, no error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_unaligned_buffers(dtype, inplace, stream):
    """Arrays whose data are not aligned to their itemsize (np.frombuffer at an odd offset)."""
    rng = np.random.default_rng(8)
    shape = (2, 2, 3, 41)
    size = int(np.prod(shape))
    item = np.dtype(dtype).itemsize

    def unaligned(values, dt):
        raw = np.zeros(values.size * np.dtype(dt).itemsize + 1, np.uint8)
        a = np.frombuffer(raw.data, dt, values.size, offset=1).reshape(values.shape)
        a[...] = values
        assert not a.flags.aligned
        return a

    base = logits(rng, shape, dtype)
    bias = unaligned(
        rng.standard_normal(shape[-1:]).astype(compute_dtype(dtype)), compute_dtype(dtype)
    )
    bounds = unaligned(np.array([2, 35], np.int64), np.int64)
    x = unaligned(base, dtype)
    out = x if inplace else unaligned(np.zeros(size, dtype).reshape(shape), dtype)
    assert item > 1
    y = run(x, out=out, bias=bias, bounds=bounds, nthreads=2)
    assert y is out
    check(y, base, bias=bias, bounds=bounds)


def test_bad_dtypes():
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        run(np.zeros((1, 1, 1, 3), np.int32))
    with pytest.raises(TypeError, match="native"):
        run(np.zeros((1, 1, 1, 3), ">f4"))
    with pytest.raises(TypeError, match="bias4"):
        run(np.zeros((1, 1, 1, 3), np.float32), bias=np.zeros(3, np.float64))


finite_or_special = st.one_of(
    st.floats(-60, 60, allow_nan=False), st.sampled_from([-np.inf, np.inf, np.nan])
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(
        np.float64, hnp.array_shapes(min_dims=4, max_dims=4, max_side=9), elements=finite_or_special
    ),
    data=st.data(),
)
def test_property_float64(x, data):
    shape = x.shape
    keep = data.draw(hnp.arrays(np.bool_, shape[-1:]))
    bias = data.draw(hnp.arrays(np.float64, shape[-2:], elements=finite_or_special))
    scale = data.draw(st.sampled_from([1.0, 0.5, -2.0, 0.0]))
    nthreads = data.draw(st.sampled_from([1, 2]))
    y = run(x, scale=scale, keep=keep, bias=bias, nthreads=nthreads)
    check(y, x, scale=scale, keep=keep, bias=bias)


# --------------------------------------------------------------------------
# laziness


def test_import_compiles_nothing_and_is_compiled():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import fastmask.kernels  # the package may import what it likes
        before = "numba" in sys.modules
        from fastmask.kernels import numba_softmax as ns
        assert before or "numba" not in sys.modules, "importing the kernel module imported numba"
        assert not ns.is_compiled(np.float64)
        ns.compile(np.float64)
        assert ns.is_compiled(np.float64) and not ns.is_compiled(np.float16)
        print("ok")
        """
    )
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
