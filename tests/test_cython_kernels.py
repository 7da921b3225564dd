"""fastmask._kernels (Cython + OpenMP) against the NumPy reference.

Covers every dtype (bfloat16 too), keep / bias / bounds alone and together, awkward
layouts (negative, non-unit and 0 strides, in place), row lengths around the kernel's
block sizes, the -inf / NaN edge cases, the vector exp and the float16 and bfloat16
conversions, each kernel ISA variant this CPU can run (and, for bfloat16, both the
VCVTNEPS2BF16 and the integer rounding), serial and 2 threads, fork handling, and
argument checks.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from fastmask.reference import masked_softmax_reference

if importlib.util.find_spec("fastmask._kernels") is None:
    pytest.skip(
        "fastmask._kernels is not built (run `python setup.py build_ext --inplace`)",
        allow_module_level=True,
    )

from fastmask import _kernels as K

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float16, BF16, np.float32, np.float64]
ISAS = K._isa_available()
LENGTHS = [*range(1, 18), 31, 32, 33, 64, 1000]


# ------------------------------------------------------------------------- helpers


def compute_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def kept_mask(shape, keep=None, bounds=None):
    """The dense keep mask the kernel's keep4 and bounds4 stand for."""
    kept = np.ones(shape, dtype=bool)
    if keep is not None:
        kept &= np.broadcast_to(keep, shape)
    if bounds is not None:
        b = np.broadcast_to(bounds, (*shape[:3], 2))
        k = np.arange(shape[3])
        kept &= (k >= b[..., :1]) & (k < b[..., 1:])
    return kept


def expected(x, scale=1.0, keep=None, bias=None, bounds=None):
    """float64 reference for the kernel's arguments."""
    kept = kept_mask(x.shape, keep, bounds)
    b = None if bias is None else np.broadcast_to(bias, x.shape)
    return masked_softmax_reference(x, keep=kept, bias=b, scale=scale)


def assert_matches(out, ref, dtype):
    out = np.asarray(out, dtype=np.float64)
    assert np.array_equal(np.isnan(out), np.isnan(ref)), "NaN pattern differs"
    assert np.all(out[ref == 0] == 0), "a masked (or empty-row) position is not exactly 0"
    if dtype == np.float64:
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    elif dtype == np.float32:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    elif dtype == BF16:
        assert_bf16_rounded(out, ref)
    else:  # within one float16 rounding step of the exact value (f32 arithmetic inside)
        with np.errstate(invalid="ignore"):
            tol = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
        ok = np.isnan(ref) | (np.abs(out - ref) <= tol)
        assert ok.all(), f"max err {np.nanmax(np.abs(out - ref) / tol)} float16 ulps"


#: Weights below this (twice bfloat16's smallest normal number) are outside the
#: contract -- the float32 exp inside flushes exp(z - max) < e^-87.3 ~ 2^-126 to 0 --
#: so they are only checked to be that small.
BF16_TINY = 2.0**-125
#: Relative error of the float32 arithmetic inside, with a wide margin: where the
#: exact weight is farther than this from a bfloat16 rounding boundary, the kernel
#: must return exactly the correctly rounded value.
F32_MARGIN = 2.0**-12


def assert_bf16_rounded(out, ref):
    """``out`` (bfloat16 weights, as float64) is ``ref`` rounded to bfloat16: within one
    bfloat16 step of the exact value everywhere, and exactly ``ref.astype(bfloat16)``
    wherever ``ref`` is not within ``F32_MARGIN`` of a rounding boundary."""
    with np.errstate(invalid="ignore"):
        rounded = ref.astype(BF16)
        lo = (ref * (1 - F32_MARGIN)).astype(BF16)
        hi = (ref * (1 + F32_MARGIN)).astype(BF16)
    finite = ~np.isnan(ref)
    normal = finite & (ref >= BF16_TINY)
    step = np.spacing(np.abs(rounded)).astype(np.float64)
    err = np.abs(out - ref)
    assert np.all(err[normal] <= step[normal]), (
        f"max err {np.max(err[normal] / step[normal])} bfloat16 steps"
    )
    assert np.all(err[finite & ~normal] <= BF16_TINY)
    sure = normal & (lo.view(np.uint16) == hi.view(np.uint16))
    assert np.array_equal(out[sure], rounded[sure].astype(np.float64)), (
        f"{np.sum(out[sure] != rounded[sure].astype(np.float64))} weights not rounded to "
        "nearest even"
    )


def run(x, out=None, scale=1.0, keep=None, bias=None, bounds=None, nthreads=1):
    """Call the kernel with 4-D arguments broadcast to x's shape (read-only views)."""
    if out is None:
        out = np.empty(x.shape, dtype=x.dtype)
    shape = x.shape
    keep4 = None if keep is None else np.broadcast_to(keep, shape)
    bias4 = None if bias is None else np.broadcast_to(bias, shape)
    bounds4 = None if bounds is None else np.broadcast_to(bounds, (*shape[:3], 2))
    K.masked_softmax_4d(x, out, scale, keep4, bias4, bounds4, 0, nthreads)
    return out


def random_case(rng, shape, dtype, with_keep, with_bias, with_bounds):
    B, H, Q, N = shape
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    keep = rng.random((B, 1, Q, N)) > 0.3 if with_keep else None
    bias = None
    if with_bias:
        bias = (rng.standard_normal((B, H, 1, N)) * 2).astype(compute_dtype(dtype))
    bounds = None
    if with_bounds:
        bounds = rng.integers(-2, N + 3, size=(B, H, Q, 2)).astype(np.int64)
    return x, keep, bias, bounds


@pytest.fixture(params=ISAS)
def isa(request):
    old = K._set_isa(request.param)
    yield request.param
    K._set_isa(old)


def _bf16_conversions():
    """(ISA variant, VCVTNEPS2BF16 allowed) pairs: every bfloat16 rounding this CPU runs."""
    pairs = []
    for name in ISAS:
        old = K._set_isa(name)
        try:
            pairs.append((name, True))
            if K.build_info()["bf16_native"]:  # the AVX-512 variant can do both
                pairs.append((name, False))
        finally:
            K._set_isa(old)
    return pairs


BF16_CONVERSIONS = _bf16_conversions()


@pytest.fixture(
    params=BF16_CONVERSIONS,
    ids=[f"{i}-{'native' if n and i == 'avx512' else 'integer'}" for i, n in BF16_CONVERSIONS],
)
def bf16_isa(request):
    """Each ISA variant and bfloat16 conversion: yields whether VCVTNEPS2BF16 is in use."""
    name, native = request.param
    old_isa = K._set_isa(name)
    old_native = K._set_bf16_native(native)
    try:
        yield K.build_info()["bf16_native"]
    finally:
        K._set_bf16_native(old_native)
        K._set_isa(old_isa)


# ------------------------------------------------------------------------ build info


def test_build_info():
    info = K.build_info()
    assert isinstance(K.openmp_enabled(), bool)
    assert info["openmp"] == K.openmp_enabled()
    assert info["isa"] in info["isa_available"]
    assert "generic" in ISAS


# --------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "keep", "bias", "bounds", "all"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_row_lengths(dtype, variant, nthreads):
    rng = np.random.default_rng(hash((np.dtype(dtype).str, variant, nthreads)) % 2**32)
    for n in LENGTHS:
        x, keep, bias, bounds = random_case(
            rng,
            (2, 3, 4, n),
            dtype,
            variant in ("keep", "all"),
            variant in ("bias", "all"),
            variant in ("bounds", "all"),
        )
        out = run(x, scale=0.7, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
        assert_matches(out, expected(x, 0.7, keep, bias, bounds), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_variant(isa, dtype):
    rng = np.random.default_rng(7)
    for n in (1, 5, 16, 31, 32, 33, 47, 100, 515):
        for flags in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 1)]:
            x, keep, bias, bounds = random_case(rng, (2, 2, 3, n), dtype, *flags)
            out = run(x, scale=-1.3, keep=keep, bias=bias, bounds=bounds, nthreads=2)
            assert_matches(out, expected(x, -1.3, keep, bias, bounds), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows(dtype):
    rng = np.random.default_rng(3)
    n = 100_003
    x, keep, bias, _ = random_case(rng, (1, 2, 2, n), dtype, True, True, False)
    bounds = np.array([[[[5, n - 7], [0, n]], [[n // 2, n + 10], [-4, 3]]]], dtype=np.int64)
    for nt in (1, 2):
        out = run(x, keep=keep, bias=bias, bounds=bounds, nthreads=nt)
        assert_matches(out, expected(x, 1.0, keep, bias, bounds), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_match_serial_bitwise(dtype):
    rng = np.random.default_rng(11)
    x, keep, bias, bounds = random_case(rng, (3, 4, 17, 77), dtype, True, True, True)
    a = run(x, keep=keep, bias=bias, bounds=bounds, nthreads=1)
    for nt in (2, 3, 64):
        b = run(x, keep=keep, bias=bias, bounds=bounds, nthreads=nt)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_not_modified(dtype):
    rng = np.random.default_rng(5)
    x, keep, bias, bounds = random_case(rng, (2, 2, 5, 40), dtype, True, True, True)
    copies = [a.copy() for a in (x, keep, bias, bounds)]
    run(x, keep=keep, bias=bias, bounds=bounds, nthreads=2)
    for a, c in zip((x, keep, bias, bounds), copies, strict=True):
        assert np.array_equal(a, c)


# -------------------------------------------------------------------------- layouts


def layouts(base):
    """Views of `base` (B, H, Q, 2N) with shape (B, H, Q, N) and awkward strides."""
    n = base.shape[3] // 2
    return {
        "contiguous": np.ascontiguousarray(base[..., :n]),
        "inner stride 2": base[..., ::2],
        "negative inner": base[..., n - 1 :: -1] if n > 0 else base[..., :0],
        "negative outer": base[::-1, :, ::-1, :n],
        "transposed": np.ascontiguousarray(base[..., :n].swapaxes(2, 3)).swapaxes(2, 3),
        "fortran": np.asfortranarray(base[..., :n]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_strided_inputs_and_outputs(dtype, nthreads):
    rng = np.random.default_rng(13)
    for n in (7, 40):
        base = (rng.standard_normal((2, 3, 5, 2 * n)) * 2).astype(dtype)
        keep_base = rng.random((2, 3, 5, 2 * n)) > 0.3
        bias_base = rng.standard_normal((2, 3, 5, 2 * n)).astype(compute_dtype(dtype))
        bounds = rng.integers(0, n + 1, size=(2, 3, 5, 2)).astype(np.int64)
        for (name, x), (_, keep), (_, bias) in zip(
            layouts(base).items(),
            layouts(keep_base).items(),
            layouts(bias_base).items(),
            strict=True,
        ):
            ref = expected(x, 0.5, keep, bias, bounds)
            for oname, out in layouts(np.zeros((2, 3, 5, 2 * n), dtype)).items():
                run(x, out, scale=0.5, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
                try:
                    assert_matches(out, ref, dtype)
                except AssertionError as exc:
                    raise AssertionError(f"x {name}, out {oname}: {exc}") from None


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_zero_strides(dtype):
    rng = np.random.default_rng(17)
    shape = (2, 3, 4, 33)
    x = np.broadcast_to((rng.standard_normal((2, 1, 4, 33)) * 2).astype(dtype), shape)
    keep = np.broadcast_to(rng.random((1, 1, 1, 33)) > 0.4, shape)
    keep_row = np.broadcast_to((rng.random((2, 3, 4, 1)) > 0.5), shape)  # 0 inner stride
    bias = np.broadcast_to(rng.standard_normal((2, 1, 1, 1)).astype(compute_dtype(dtype)), shape)
    bounds = np.broadcast_to(np.array([3, 30], dtype=np.int64), (2, 3, 4, 2))
    for k in (keep, keep_row):
        out = np.empty(shape, dtype)
        K.masked_softmax_4d(x, out, 1.5, k, bias, bounds, 0, 2)
        assert_matches(out, expected(x, 1.5, k, bias, bounds), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_in_place(dtype, nthreads):
    rng = np.random.default_rng(19)
    for n in (3, 32, 45, 300):
        x, keep, bias, bounds = random_case(rng, (2, 2, 3, n), dtype, True, True, True)
        ref = expected(x, 0.9, keep, bias, bounds)
        run(x, x, scale=0.9, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
        assert_matches(x, ref, dtype)
        # in place on a strided view
        base = (rng.standard_normal((2, 2, 3, 2 * n)) * 2).astype(dtype)
        view = base[..., ::2]
        ref = expected(view, 0.9, keep, bias, bounds)
        untouched = base[..., 1::2].copy()
        run(view, view, scale=0.9, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
        assert_matches(view, ref, dtype)
        assert np.array_equal(base[..., 1::2], untouched)


def test_empty_shapes():
    for shape in [(0, 2, 3, 4), (2, 0, 3, 4), (2, 3, 0, 4), (2, 3, 4, 0)]:
        x = np.ones(shape, np.float32)
        out = np.empty_like(x)
        K.masked_softmax_4d(x, out, 1.0, None, None, None, 0, 2)


# --------------------------------------------------------------- -inf / NaN semantics


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_positions_are_exact_zeros(dtype):
    rng = np.random.default_rng(23)
    x = (rng.standard_normal((1, 2, 3, 70)) * 50).astype(dtype)  # tiny exp values too
    keep = rng.random((1, 2, 3, 70)) > 0.5
    bounds = np.array([10, 60], dtype=np.int64)
    out = run(x, keep=keep, bounds=bounds)
    kept = kept_mask(x.shape, keep, bounds)
    assert np.all(out[~kept] == 0) and not np.signbit(out[~kept]).any()
    np.testing.assert_allclose(out.astype(np.float64).sum(-1), 1.0, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 40])
def test_fully_masked_and_all_minus_inf_rows_are_zero(dtype, n):
    x = np.ones((1, 1, 5, n), dtype)
    ct = compute_dtype(dtype)
    keep = np.ones((1, 1, 5, n), bool)
    keep[0, 0, 0] = False  # nothing kept
    x[0, 0, 1] = -np.inf  # every logit -inf
    bias = np.zeros((1, 1, 5, n), ct)
    bias[0, 0, 2] = -np.inf  # every bias -inf
    bounds = np.tile(np.array([0, n], np.int64), (1, 1, 5, 1))
    bounds[0, 0, 3] = [4, 4]  # empty span
    bounds[0, 0, 4] = [n + 5, -3]  # inverted span, out of range
    for nt in (1, 2):
        out = run(x, keep=keep, bias=bias, bounds=bounds, nthreads=nt)
        assert np.all(out == 0) and not np.signbit(out).any()
    ref = expected(x, 1.0, keep, bias, bounds)
    assert np.all(ref == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 31, 64, 97])
def test_nan_rows(dtype, n):
    rng = np.random.default_rng(29)
    rows = 7
    x = rng.standard_normal((1, 1, rows, n)).astype(dtype)
    j = n // 2
    x[0, 0, 0, j] = np.nan  # kept NaN: whole row NaN
    x[0, 0, 1, j] = np.inf  # kept +inf: whole row NaN
    x[0, 0, 2, :] = -np.inf
    x[0, 0, 2, j] = np.nan  # max is -inf but a NaN is kept: NaN
    x[0, 0, 3, 0] = np.nan  # NaN outside the bounds: ignored
    x[0, 0, 4, j] = np.nan  # NaN dropped by keep: ignored
    x[0, 0, 5, :] = -np.inf  # all -inf: zeros
    x[0, 0, 6, j] = np.nan  # kept NaN, row bounded: all N positions NaN
    keep = np.ones(x.shape, bool)
    keep[0, 0, 4, j] = False
    bounds = np.tile(np.array([0, n], np.int64), (1, 1, rows, 1))
    bounds[0, 0, 3] = [1, n]
    bounds[0, 0, 6] = [j, j + 1]
    for nt in (1, 2):
        out = run(x, keep=keep, bounds=bounds, nthreads=nt)
        ref = expected(x, 1.0, keep, None, bounds)
        assert_matches(out, ref, dtype)
        for r in (0, 1, 2, 6):
            assert np.isnan(out[0, 0, r]).all()
        assert np.all(out[0, 0, 5] == 0)
        assert not np.isnan(out[0, 0, (3, 4)]).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_every_lane(isa, dtype):
    """The vector max must drop a NaN in any lane; the sum must then spread it."""
    n = 67
    x = np.zeros((1, 1, n, n), dtype)
    rows = np.arange(n)
    x[0, 0, rows, rows] = np.nan
    x[0, 0, rows, (rows + 1) % n] = 5.0
    out = run(x, nthreads=2)
    assert np.isnan(out).all()
    keep = ~np.isnan(x)
    out = run(x, keep=keep, nthreads=2)
    assert_matches(out, expected(x, 1.0, keep), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_minus_inf_and_large_logits(dtype):
    rng = np.random.default_rng(31)
    ct = compute_dtype(dtype)
    x = (rng.standard_normal((1, 2, 4, 50)) * (10 if dtype == np.float16 else 300)).astype(dtype)
    bias = np.where(rng.random((1, 2, 4, 50)) > 0.6, -np.inf, 0).astype(ct)
    out = run(x, bias=bias)
    assert np.all(out[np.isneginf(np.broadcast_to(bias, x.shape))] == 0)
    assert_matches(out, expected(x, 1.0, None, bias), dtype)


# ------------------------------------------------------------------ exp, float16 bits


def test_exp_accuracy(isa):
    x = np.linspace(-87.3, 0.5, 400_001).astype(np.float32)
    y = K._exp(x).astype(np.float64)
    r = np.exp(x.astype(np.float64))
    ulp = np.spacing(r.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(y - r) / ulp) < 1.5
    xd = np.linspace(-708.0, 0.5, 400_001)
    yd = K._exp(xd)
    rd = np.exp(xd)
    assert np.max(np.abs(yd - rd) / np.spacing(rd)) <= 2.0
    for dt, lo in ((np.float32, -87.3), (np.float64, -708.0)):
        special = np.array([-np.inf, -1e30, lo - 0.01, 2 * lo, np.nan, 0.0, -0.0], dt)
        got = K._exp(special)
        assert np.array_equal(got[:4], np.zeros(4, dt)) and not np.signbit(got[:4]).any()
        assert np.isnan(got[4]) and got[5] == 1 and got[6] == 1
        assert K._exp(np.array([lo + 0.001], dt))[0] > 0


def test_half_to_float_all_65536(isa):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = K._half_to_float(bits)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_float_to_half_rounding(isa):
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    f = finite.astype(np.float32)
    # every half, the midpoints between neighbours (ties) and one float32 ulp around them
    with np.errstate(over="ignore"):
        up = np.nextafter(finite, np.float16(np.inf)).astype(np.float32)
    mid = ((f.astype(np.float64) + up.astype(np.float64)) / 2).astype(np.float32)
    cases = [f, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))]
    rng = np.random.default_rng(37)
    random_bits = rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32)
    cases.append(random_bits.view(np.float32))
    cases.append(
        np.array(
            [
                65504,
                65519.996,
                65520,
                65536,
                1e10,
                np.inf,
                -np.inf,
                np.nan,
                2.0**-24,
                2.0**-25,
                2.0**-25 * 1.0000001,
                2.0**-26,
                1e-45,
                -0.0,
            ],
            np.float32,
        )
    )
    x = np.concatenate(cases)
    got = K._float_to_half(x)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got.view(np.float16)), nan)
    assert np.array_equal(got[~nan], want[~nan].view(np.uint16))


def test_float16_kernel_rounds_like_numpy():
    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, 2, 8, 100)).astype(np.float16)
    out = run(x, nthreads=2)
    f32 = masked_softmax_reference(x, dtype=None)  # float32 arithmetic, like the kernel
    diff = np.abs(out.astype(np.float64) - f32.astype(np.float16).astype(np.float64))
    assert np.all(diff <= np.spacing(np.abs(f32).astype(np.float16)).astype(np.float64))


# ------------------------------------------------------------------------- bfloat16

BF16_LENGTHS = [1, 15, 16, 17, 63, 64, 65, 1000, 1025]


def _bf16_bits(a):
    return np.asarray(a).view(np.uint16)


def test_bf16_native_follows_the_cpu():
    """VCVTNEPS2BF16 is used by the AVX-512 variant exactly where the CPU has it."""
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    if "avx512" not in ISAS:
        assert not K.build_info()["bf16_native"]
        return
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    old = K._set_isa("avx512")
    try:
        assert K.build_info()["bf16_native"] == ("avx512_bf16" in flags.split())
        for name in ISAS:
            K._set_isa(name)
            assert K.build_info()["bf16_native"] == (
                name == "avx512" and "avx512_bf16" in flags.split()
            )
    finally:
        K._set_isa(old)


def test_bfloat16_to_float_all_65536(isa):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = K._bfloat16_to_float(bits)
    want = bits.view(BF16).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _bf16_rounding_cases():
    """float32 inputs that exercise every case of rounding to bfloat16: each of the 65536
    upper halves with the lower halves that decide the rounding (exact, just above 0,
    just below / at / just above the midpoint, the largest), plus random patterns and
    named specials (max, values that round up to inf, inf, NaNs, subnormals, ties)."""
    high = np.arange(65536, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    structured = (high[:, None] | low[None, :]).ravel()
    rng = np.random.default_rng(43)
    random_bits = rng.integers(0, 2**32, size=1_000_003, dtype=np.uint64).astype(np.uint32)
    named = np.array(
        [
            0x7F7FFFFF,  # float32 max: rounds up to inf
            0x7F7F8000,  # tie below inf with an odd last bit: inf
            0x7F7F7FFF,  # just below that tie: bfloat16 max
            0x7F7E8000,  # tie with an even last bit: stays
            0x7F800000,  # inf
            0xFF800000,  # -inf
            0x7F800001,  # signalling NaN, smallest payload
            0x7FBFFFFF,  # signalling NaN, largest payload
            0x7FC00000,  # the quiet NaN
            0xFFC00001,  # negative quiet NaN with a payload
            0x00000001,  # smallest subnormal: 0
            0x00008000,  # subnormal tie, even: 0
            0x00018000,  # subnormal tie, odd: up
            0x007F8000,  # largest subnormal tie: rounds up to the smallest normal
            0x007FFFFF,  # largest subnormal
            0x80000001,  # negative subnormal: -0
            0x80018000,
            0x00800000,  # smallest normal
            0x3F808000,  # 1 + 2^-8: tie, even: 1
            0x3F818000,  # tie, odd: up
            0x80000000,  # -0
        ],
        np.uint32,
    )
    # An odd count, so the vector loops end with a partial block.
    return np.concatenate([structured, random_bits, named]).view(np.float32)


def test_float_to_bfloat16_rounding(bf16_isa):
    x = _bf16_rounding_cases()
    got = K._float_to_bfloat16(x)
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(BF16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    # NaN stays NaN: sign and the top payload bits kept, the quiet bit set (what
    # VCVTNEPS2BF16 does, so both conversions give the same bits)
    xb = x[nan].view(np.uint32)
    assert np.array_equal(got[nan], ((xb >> 16) | 0x40).astype(np.uint16))
    # every length of a partial last block
    for n in range(1, 40):
        assert np.array_equal(K._float_to_bfloat16(x[-n:]), K._float_to_bfloat16(x)[-n:])


@pytest.mark.parametrize("variant", ["plain", "all"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_bf16_rows(bf16_isa, variant, nthreads):
    rng = np.random.default_rng(47 + nthreads)
    flags = (variant == "all",) * 3
    for n in BF16_LENGTHS:
        x, keep, bias, bounds = random_case(rng, (2, 3, 4, n), BF16, *flags)
        out = run(x, scale=0.7, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
        ref = expected(x, 0.7, keep, bias, bounds)
        assert_matches(out, ref, BF16)
        if variant == "all":
            kept = kept_mask(x.shape, keep, bounds)
            assert np.all(_bf16_bits(out)[~kept] == 0)  # exactly +0


@pytest.mark.parametrize("n", [17, 65, 1025])
def test_bf16_strided_inputs_and_outputs(bf16_isa, n):
    rng = np.random.default_rng(53)
    base = (rng.standard_normal((2, 3, 5, 2 * n)) * 2).astype(BF16)
    bias = rng.standard_normal((2, 1, 5, n)).astype(np.float32)
    bounds = rng.integers(0, n + 1, size=(2, 3, 5, 2)).astype(np.int64)
    for name, x in layouts(base).items():
        ref = expected(x, 0.5, None, bias, bounds)
        want = run(np.ascontiguousarray(x), scale=0.5, bias=bias, bounds=bounds)
        for oname, out in layouts(np.zeros((2, 3, 5, 2 * n), BF16)).items():
            run(x, out, scale=0.5, bias=bias, bounds=bounds, nthreads=2)
            try:
                assert_matches(out, ref, BF16)
                assert np.array_equal(_bf16_bits(out), _bf16_bits(want))
            except AssertionError as exc:
                raise AssertionError(f"x {name}, out {oname}: {exc}") from None


@pytest.mark.parametrize("n", [65, 100, 1025])
def test_bf16_is_the_float32_result_rounded(bf16_isa, n):
    """A bfloat16 row is the float32 row of the same (widened) logits, rounded to nearest
    even: bit for bit. (Rows of more than 64 keys: on AVX-512, float32 rows of at most
    64 keys take a register-only path of their own.)"""
    rng = np.random.default_rng(59)
    x, keep, bias, bounds = random_case(rng, (2, 2, 6, n), BF16, True, True, True)
    x[0, 0, 0, 3] = np.nan
    x[1, 1, 2, :] = -np.inf
    got = run(x, scale=0.9, keep=keep, bias=bias, bounds=bounds, nthreads=2)
    f32 = run(x.astype(np.float32), scale=0.9, keep=keep, bias=bias, bounds=bounds)
    with np.errstate(invalid="ignore"):
        want = f32.astype(BF16)
    nan = np.isnan(f32)
    assert np.array_equal(np.isnan(got), nan)
    assert np.all(_bf16_bits(got)[nan] == 0x7FC0)  # a NaN row: the quiet NaN
    assert np.array_equal(_bf16_bits(got)[~nan], _bf16_bits(want)[~nan])


def test_bf16_subnormal_weights(bf16_isa):
    """Weights below 2^-126 (float32 and bfloat16 subnormals) are rounded like any other
    (VCVTNEPS2BF16 alone would flush them to 0): e^-87 / k for k keys at the max."""
    rows = []
    for k in (1, 2, 3, 4, 7, 100, 300):
        for n in (k + 1, 33, 70):
            if n > k:
                row = np.full(70, -np.inf, np.float32)
                row[:k] = 0.0
                row[k:n] = -87.0
                rows.append(row)
    x = np.array(rows).reshape(1, 1, -1, 70).astype(BF16)
    got = run(x, nthreads=2)
    f32 = run(x.astype(np.float32))
    assert ((f32 > 0) & (f32 < 2.0**-126)).any()  # subnormal float32 weights happen
    bits = _bf16_bits(got)
    assert ((bits & 0x7F80 == 0) & (bits & 0x7F != 0)).any()  # and subnormal bfloat16 ones
    assert np.array_equal(bits, _bf16_bits(f32.astype(BF16)))
    ref = expected(x)
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err[ref < 2.0**-126] <= 2.0**-133)  # one subnormal step


def test_bf16_nan_and_empty_rows_bits(bf16_isa):
    n = 40
    x = np.ones((1, 1, 4, n), BF16)
    x[0, 0, 0, 5] = np.nan
    x[0, 0, 1, 7] = np.inf
    x[0, 0, 2, :] = -np.inf
    keep = np.ones(x.shape, bool)
    keep[0, 0, 3] = False
    for out in (np.empty(x.shape, BF16), np.zeros((1, 1, 4, 2 * n), BF16)[..., ::2]):
        run(x, out, keep=keep, nthreads=1)
        bits = _bf16_bits(out)
        assert np.all(bits[0, 0, :2] == 0x7FC0)
        assert np.all(bits[0, 0, 2:] == 0)


@pytest.mark.parametrize(
    "case", ["tiles", "decode", "split keys", "nan and empty rows", "subnormal outputs"]
)
def test_attention_bf16_output(bf16_isa, case):
    """The engine's bfloat16 output is its float32 output rounded to nearest even (the
    same scores, sums and products; only the store differs), NaN rows the quiet NaN."""
    rng = np.random.default_rng(61)
    b, h, lq, lk, d, dv = {
        "tiles": (2, 4, 70, 130, 40, 24),
        "decode": (2, 8, 1, 300, 64, 64),
        "split keys": (1, 4, 1, 3000, 64, 48),
        "nan and empty rows": (1, 4, 20, 200, 16, 16),
        "subnormal outputs": (1, 2, 3, 40, 16, 32),
    }[case]
    hk = 2 if case == "decode" else h
    q = rng.standard_normal((b, h, lq, d)).astype(np.float32)
    k = rng.standard_normal((b, hk, lk, d)).astype(np.float32)
    v = rng.standard_normal((b, hk, lk, dv)).astype(np.float32)
    if case == "subnormal outputs":
        v *= np.float32(2.0**-130)
    bounds = np.broadcast_to(np.array([0, lk], np.int64), (b, h, lq, 2)).copy()
    keep = bias = None
    if case == "tiles":
        keep = np.broadcast_to(rng.random((b, 1, lq, lk)) > 0.3, (b, h, lq, lk))
        bias = np.broadcast_to(rng.standard_normal((1, h, 1, lk)).astype(np.float32),
                               (b, h, lq, lk))  # fmt: skip
    if case == "nan and empty rows":
        k[0, 0, 50, 3] = np.nan  # head 0: a kept NaN score, every row NaN
        v[0, 1, 60, 2] = np.nan  # head 1: a NaN value: one NaN output column
        v[0, 2, 70, 0] = np.inf  # head 2: an inf value
        bounds[0, 3, ::2] = [5, 5]  # head 3: every other row keeps nothing
    group = h // hk
    outs = {}
    for dtype in (np.float32, BF16):
        out = np.zeros((b, h, lq, dv), dtype)
        K.attention_4d(q, k, v, out, keep, bias, bounds, 1 / np.sqrt(d), group, 2)
        outs[dtype] = out
    got, f32 = outs[BF16], outs[np.float32]
    with np.errstate(invalid="ignore", over="ignore"):
        want = f32.astype(BF16)
    nan = np.isnan(f32)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(_bf16_bits(got)[~nan], _bf16_bits(want)[~nan])
    if case == "nan and empty rows":
        assert np.all(_bf16_bits(got)[0, 0] == 0x7FC0)
        assert np.isnan(got[0, 1, :, 2]).all() and not np.isnan(got[0, 1, :, :2]).any()
        assert np.all(_bf16_bits(got)[0, 3, ::2] == 0)
    if case == "subnormal outputs":
        assert (_bf16_bits(got) & 0x7F80 == 0).mean() > 0.9


def test_bf16_bad_arguments():
    x = np.zeros((2, 3, 4, 5), BF16)
    out = np.zeros_like(x)
    f = K.masked_softmax_4d
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        f(x.view(np.int16), out.view(np.int16), 1.0, None, None, None, 0, 1)
    with pytest.raises(TypeError, match="bfloat16"):
        f(x, out.astype(np.float16), 1.0, None, None, None, 0, 1)
    with pytest.raises(TypeError, match="bfloat16"):
        f(x.astype(np.float16), out, 1.0, None, None, None, 0, 1)
    with pytest.raises(TypeError, match="expected native float32"):  # bias: compute dtype
        f(x, out, 1.0, None, np.zeros(x.shape, BF16), None, 0, 1)
    with pytest.raises(TypeError, match="byte order"):
        f(x.astype(BF16.newbyteorder(">")), out, 1.0, None, None, None, 0, 1)
    f(x, out, 1.0, None, np.zeros(x.shape, np.float32), None, 0, 1)
    assert np.all(_bf16_bits(out) == _bf16_bits(np.array([0.2], BF16))[0])
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(TypeError, match="expected float64"):
        K.attention_4d(q, q, q, np.zeros((1, 2, 3, 4), BF16), None, None, None, 1.0, 1, 1)
    q = q.astype(np.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        K.attention_4d(q, q, q, np.zeros((1, 2, 3, 4), np.int16), None, None, None, 1.0, 1, 1)


# ---------------------------------------------------------------------- fork safety


def _run_script(code, timeout=60):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(K.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


FORK_SCRIPT = """
import os, sys, time, signal
import numpy as np
from fastmask import _kernels as K
{hooks}
x = np.random.default_rng(0).standard_normal((2, 4, 64, 256), dtype=np.float32)
out = np.empty_like(x)
K.masked_softmax_4d(x, out, 1.0, None, None, None, 0, 2)
ref = out.copy()
pid = os.fork()
if pid == 0:
    o2 = np.empty_like(x)
    for _ in range(5):
        K.masked_softmax_4d(x, o2, 1.0, None, None, None, 0, 2)
    os._exit(0 if np.array_equal(o2, ref) else 3)
deadline = time.time() + 20
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    if time.time() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        sys.exit(99)
    time.sleep(0.02)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_goes_serial():
    hooks = "os.register_at_fork(after_in_child=K.after_fork_in_child)"
    res = _run_script(FORK_SCRIPT.format(hooks=hooks))
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_keeps_openmp_after_pool_pause():
    hooks = (
        "os.register_at_fork(before=K.before_fork, after_in_parent=K.after_fork_in_parent,"
        " after_in_child=K.after_fork_in_child)"
    )
    res = _run_script(FORK_SCRIPT.format(hooks=hooks))
    assert res.returncode == 0, res.stderr


def test_after_fork_in_child_makes_calls_serial():
    code = """
    import numpy as np
    from fastmask import _kernels as K
    x = np.random.default_rng(1).standard_normal((2, 2, 9, 33)).astype(np.float32)
    a = np.empty_like(x); b = np.empty_like(x)
    K.masked_softmax_4d(x, a, 1.0, None, None, None, 0, 2)
    K.after_fork_in_child()
    assert K.build_info()["serial_only"]
    K.masked_softmax_4d(x, b, 1.0, None, None, None, 0, 2)
    assert np.array_equal(a, b)
    """
    res = _run_script(code)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------- bad arguments


def test_bad_arguments():
    x = np.zeros((2, 3, 4, 5), np.float32)
    out = np.empty_like(x)
    f = K.masked_softmax_4d

    def raises(exc, *args, **kw):
        with pytest.raises(exc):
            f(*args, **kw)

    raises(TypeError, x.tolist(), out, 1.0, None, None, None, 0, 1)
    raises(TypeError, x, None, 1.0, None, None, None, 0, 1)
    raises(TypeError, x.astype(np.int32), out, 1.0, None, None, None, 0, 1)
    raises(TypeError, x.astype(">f4"), out, 1.0, None, None, None, 0, 1)
    raises(TypeError, x, out.astype(np.float64), 1.0, None, None, None, 0, 1)
    raises(ValueError, x[0], out[0], 1.0, None, None, None, 0, 1)
    raises(ValueError, x, out[..., :4], 1.0, None, None, None, 0, 1)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    raises(ValueError, x, ro, 1.0, None, None, None, 0, 1)
    raises(ValueError, x, np.broadcast_to(out[:, :1], x.shape), 1.0, None, None, None, 0, 1)
    raises(ValueError, x, out, float("inf"), None, None, None, 0, 1)
    raises(ValueError, x, out, float("nan"), None, None, None, 0, 1)
    raises(ValueError, x, out, 1.0, None, None, None, 0, 0)
    # keep
    raises(TypeError, x, out, 1.0, np.ones(x.shape, np.uint8), None, None, 0, 1)
    raises(TypeError, x, out, 1.0, [[True]], None, None, 0, 1)
    raises(ValueError, x, out, 1.0, np.ones((2, 3, 4, 4), bool), None, None, 0, 1)
    raises(ValueError, x, out, 1.0, np.ones((2, 3, 5), bool), None, None, 0, 1)
    # bias: the compute dtype only
    raises(TypeError, x, out, 1.0, None, np.zeros(x.shape, np.float64), None, 0, 1)
    raises(
        TypeError,
        x.astype(np.float16),
        out.astype(np.float16),
        1.0,
        None,
        np.zeros(x.shape, np.float16),
        None,
        0,
        1,
    )
    raises(ValueError, x, out, 1.0, None, np.zeros((2, 3, 1, 5), np.float32), None, 0, 1)
    # bounds
    raises(TypeError, x, out, 1.0, None, None, np.zeros((2, 3, 4, 2), np.int32), 0, 1)
    raises(ValueError, x, out, 1.0, None, None, np.zeros((2, 3, 4, 3), np.int64), 0, 1)
    # overlaps: out partially over x, out over an input
    big = np.zeros((2, 3, 4, 6), np.float32)
    raises(ValueError, big[..., :5], big[..., 1:], 1.0, None, None, None, 0, 1)
    bias = np.zeros(x.shape, np.float32)
    raises(ValueError, x, bias, 1.0, None, bias, None, 0, 1)
    # misaligned data
    raw = np.zeros(2 * 3 * 4 * 5 * 4 + 1, np.uint8)[1:]
    mis = raw.view(np.float32).reshape(x.shape) if raw.ctypes.data % 4 else None
    if mis is not None:
        raises(ValueError, mis, out, 1.0, None, None, None, 0, 1)
    # and the arrays are untouched after all that
    assert not x.any()


def test_accepts_longlong_bounds_and_readonly_inputs():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5) / 10
    x.flags.writeable = False
    bounds = np.broadcast_to(np.array([1, 4], dtype=np.longlong), (2, 3, 4, 2))
    out = np.empty(x.shape, np.float32)
    K.masked_softmax_4d(x, out, 1.0, None, None, bounds, 5, 2)
    assert_matches(out, expected(x, 1.0, None, None, bounds), np.float32)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40, 63, 64, 65])
@pytest.mark.parametrize("scale", [1.0, -0.5, 0.0])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_short_rows_with_every_special_value(isa, n, scale, nthreads):
    # float32 rows of <= 64 keys take a register-only path (two rows at a time) on
    # AVX-512; odd row counts, spans cut by bounds and every special value must still
    # follow the general rules.
    rng = np.random.default_rng(n)
    shape = (3, 1, 7, n)  # 21 rows: an odd one out for the two-row path
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x[0, 0, 1, rng.integers(n)] = np.nan
    x[0, 0, 2, :] = -np.inf
    x[0, 0, 3, rng.integers(n)] = np.inf
    x[1, 0, 4, rng.integers(n)] = -np.inf
    x[2, 0, 5, :] = 1e30  # exp overflow guard: equal huge logits
    bounds = rng.integers(-2, n + 3, size=(3, 1, 7, 2)).astype(np.int64)
    bounds[2, 0, 0] = (0, n)
    bounds[2, 0, 1] = (n // 2, n // 2)  # empty span
    for b in (None, bounds):
        out = run(x, scale=scale, bounds=b, nthreads=nthreads)
        with np.errstate(invalid="ignore"):  # the reference's 0 * inf
            ref = expected(x, scale=scale, bounds=b)
        assert_matches(out, ref, np.float32)


@pytest.fixture
def stream_from_1mib():
    old = K._set_stream_min_bytes(1 << 20)
    yield
    K._set_stream_min_bytes(old)


def _placed(shape, offset, rng, width=None):
    """A float32 array of ``shape`` starting ``offset`` bytes past a 64-byte boundary,
    its rows ``width`` floats apart (default: contiguous)."""
    width = width or shape[-1]
    nbytes = int(np.prod(shape[:-1])) * width * 4
    buf = np.empty(nbytes + 128, np.uint8)
    start = -buf.ctypes.data % 64 + offset
    full = buf[start : start + nbytes].view(np.float32).reshape(*shape[:-1], width)
    a = full[..., : shape[-1]]
    a[...] = rng.standard_normal(shape, dtype=np.float32)
    return a


@pytest.mark.parametrize("variant", ["plain", "keep", "bias", "bounds", "in place"])
@pytest.mark.parametrize(
    "layout", ["aligned rows", "aligned rows with a partial last line", "unaligned rows"]
)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_large_float32_outputs_streamed(isa, stream_from_1mib, variant, layout, nthreads):
    # Large outputs whose rows start on 64-byte lines are written with streaming
    # stores on AVX-512 (an ordinary store for a last partial line; unaligned rows
    # are not streamed); every special row must still follow the general rules.
    rng = np.random.default_rng(3)
    n, width, offset = {
        "aligned rows": (1024, None, 0),
        "aligned rows with a partial last line": (1000, 1024, 0),
        "unaligned rows": (1000, None, 20),
    }[layout]
    shape = (2, 4, 64, n)  # >= 1 MiB of float32
    x = _placed(shape, offset, rng, width)
    x[0, 1, 2, 7] = np.nan
    x[1, 3, 4, :] = -np.inf
    x[1, 2, 6, 100] = np.inf
    keep = bias = bounds = None
    if variant == "keep":
        keep = rng.random((2, 1, 1, n)) > 0.3
    if variant == "bias":
        bias = np.where(rng.random((2, 1, 64, n)) > 0.2, 0.0, -np.inf).astype(np.float32)
    if variant == "bounds":
        bounds = rng.integers(-3, n + 5, size=(2, 4, 64, 2)).astype(np.int64)
    ref = expected(x, keep=keep, bias=bias, bounds=bounds)
    out = x if variant == "in place" else _placed(shape, offset, rng, width)
    got = run(x, out=out, keep=keep, bias=bias, bounds=bounds, nthreads=nthreads)
    assert_matches(got, ref, np.float32)
