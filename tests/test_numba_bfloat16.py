"""bfloat16 in the Numba kernel: the conversions against ml_dtypes, and what only bfloat16 has.

bfloat16 reaches the jitted code as the ``int16`` of its bits (float16 as
``uint16``): ``numba_exp.bf16_to_f32`` widens by a shift, ``numba_exp.f32_to_bf16``
and the streaming line stores narrow with an integer round to nearest even. Both
must give ml_dtypes' bits for every input, NaN and the values that round past the
largest bfloat16 included. The kernel's general cases (masks, layouts, threads,
in place, unaligned, streaming) run for bfloat16 in ``test_numba_fastmath.py``.
"""

from __future__ import annotations

import importlib.util

import ml_dtypes
import numpy as np
import pytest

numba = pytest.importorskip("numba")

from fastmask import masks  # noqa: E402
from fastmask.kernels import numba_exp as ne  # noqa: E402
from fastmask.kernels import numba_softmax as ns  # noqa: E402
from fastmask.reference import masked_softmax_reference  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def _u32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint64).astype(np.uint32)


def _f32(bits) -> np.ndarray:
    return _u32(bits).view(np.float32)


def interesting_f32() -> np.ndarray:
    """float32 inputs for the narrowing: every bfloat16 value, every midpoint between
    neighbours (ties) and its two float32 neighbours, the edges of the range, NaN
    payloads, subnormals, and random bit patterns."""
    every = np.arange(1 << 16, dtype=np.uint32) << 16  # each bfloat16, exactly
    mids = every | 0x8000  # halfway to the next bfloat16 up (in magnitude)
    specials = [
        0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # max, below / at / past its tie: inf
        0x7F800000, 0xFF800000, 0xFF7F8000, 0xFF7F7FFF,  # +-inf, -max rounding to -inf
        0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001, 0x7FFFFFFF,  # NaNs, quiet and not
        0xFF800001, 0xFFC00000, 0xFFFFFFFF,
        0x00000001, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000,  # subnormals, ties to even
        0x007FFFFF, 0x007F8000, 0x00800000, 0x80000000, 0x80008000, 0x80018000,
        0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF,  # 1 + half an ulp (even), odd ties
    ]  # fmt: skip
    rnd = np.random.default_rng(3).integers(0, 2**32, 1_000_000, dtype=np.uint64)
    bits = np.concatenate([every, mids, mids - 1, mids + 1, _u32(specials), _u32(rnd)]).astype(
        np.uint32
    )
    return bits.view(np.float32)


def ml_bits(v: np.ndarray) -> np.ndarray:
    """ml_dtypes' bfloat16 bits of float32 ``v`` (as int16)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(BF16).view(np.int16)


@pytest.fixture(scope="module")
def loops():
    ns._install()

    @numba.njit
    def widen(b, o):
        for i in range(b.size):
            o[i] = ne.bf16_to_f32(b[i])

    @numba.njit(fastmath=set(ns.LOOP_FASTMATH))  # the kernels' flags: still exact
    def narrow(v, o):
        for i in range(v.size):
            o[i] = ne.f32_to_bf16(v[i])

    @numba.njit
    def narrow_lines(v, o, start):
        # non-temporal line stores of 32 values at a time (o[start:] is 64-byte aligned)
        dp = ne.address(o, start)
        sp = ne.address(v, 0)
        for j in range(0, v.size, 32):
            ne.stream_line(dp, j, sp, j, np.float32(1.0))
        ne.store_fence()

    return widen, narrow, narrow_lines


def test_widening_is_exact_for_every_value(loops):
    widen, _, _ = loops
    b = np.arange(-(1 << 15), 1 << 15, dtype=np.int32).astype(np.int16)
    f = np.empty(b.size, np.float32)
    widen(b, f)
    ref = b.view(BF16).astype(np.float32)  # payloads too: both are a shift
    np.testing.assert_array_equal(f.view(np.uint32), ref.view(np.uint32))


def test_narrowing_matches_ml_dtypes_bit_for_bit(loops):
    _, narrow, _ = loops
    v = interesting_f32()
    out = np.empty(v.size, np.int16)
    narrow(v, out)
    np.testing.assert_array_equal(out, ml_bits(v))
    nan = np.isnan(v)
    assert set(np.unique(out[nan].view(np.uint16))) == {0x7FC0, 0xFFC0}
    assert _f32(0x7F7F8000).astype(BF16).view(np.uint16) == 0x7F80  # ml_dtypes: rounds to inf


def test_streaming_line_conversion_matches_ml_dtypes(loops):
    _, _, narrow_lines = loops
    v = interesting_f32()
    v = np.concatenate([v, np.zeros(-v.size % 32, np.float32)])
    raw = np.zeros(v.size + 32, np.int16)
    start = (-raw.ctypes.data % 64) // 2
    narrow_lines(v, raw, start)
    np.testing.assert_array_equal(raw[start : start + v.size], ml_bits(v))


def test_the_python_definitions_match_ml_dtypes():
    """The plain-Python functions numba_exp documents (before install() replaces them)."""
    spec = importlib.util.spec_from_file_location("numba_exp_definitions", ne.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    v = interesting_f32()
    pick = np.random.default_rng(0).choice(v.size, 3000, replace=False)
    v = np.concatenate([v[pick], v[(1 << 18) : (1 << 18) + 300]])  # and the specials
    got = np.array([mod.f32_to_bf16(np.float32(t)) for t in v], np.int16)
    np.testing.assert_array_equal(got, ml_bits(v))
    b = np.array([0, 1, 0x7F7F, 0x7F80, 0x7FC1, -1, -0x8000, 0x3F80], np.int16)
    widened = np.array([mod.bf16_to_f32(t) for t in b], np.float32)
    np.testing.assert_array_equal(
        widened.view(np.uint32), b.view(BF16).astype(np.float32).view(np.uint32)
    )


# --------------------------------------------------------------------------
# the kernel


def kernel(x, out=None, *, scale=1.0, keep=None, bias=None, bounds=None, nthreads=1, **fns):
    out = np.empty(x.shape, x.dtype) if out is None else out
    ns.masked_softmax_4d(x, out, scale, keep, bias, bounds, 0, nthreads, **fns)
    return out


def reference(x, keep=None, bias=None, scale=1.0):
    with np.errstate(invalid="ignore"):
        return masked_softmax_reference(x.astype(np.float64), keep, bias, scale)


def assert_one_ulp(y, ref):
    """``y`` within one bfloat16 ulp of float64 ``ref`` rounded to bfloat16."""
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(y.astype(np.float32)), ~ok)
    d = np.abs(y[ok].view(np.int16).astype(np.int32) - ref[ok].astype(BF16).view(np.int16))
    assert d.max(initial=0) <= 1, d.max()


def test_signature_and_keys_tell_bfloat16_from_float16():
    from numba.core import types

    bf, f16 = ns._signature(ns._check_dtype(BF16)), ns._signature(np.dtype(np.float16))
    assert bf.args[0].dtype == types.int16 and f16.args[0].dtype == types.uint16
    assert bf.args[3].dtype == types.float32  # the bias: the compute dtype
    assert ns._key(BF16, True, True) != ns._key(np.dtype(np.float16), True, True)
    # ml_dtypes' uint1 has bfloat16's one-letter code 'E': it must not pass for it
    assert np.dtype(ml_dtypes.uint1).char == BF16.char
    for dt in (ml_dtypes.uint1, ml_dtypes.float8_e4m3fn, np.int16, np.uint16):
        with pytest.raises(TypeError, match="bfloat16"):
            ns.is_compiled(dt)
        with pytest.raises(TypeError, match="bfloat16"):
            kernel(np.zeros((1, 1, 1, 4), dt))


def test_compile_and_is_compiled():
    ns.compile(BF16)
    assert ns.is_compiled(BF16) and ns.is_compiled(ml_dtypes.bfloat16)
    assert ("bfloat16", False) in ns._kernels and ("bfloat16", True) in ns._kernels


@pytest.mark.parametrize("nthreads", [1, 2])
def test_edge_rows_and_nan_bits(nthreads):
    n = 19  # odd: vector tails
    x = np.linspace(-4, 4, 6 * n).reshape(1, 1, 6, n).astype(BF16)
    keep = np.ones(x.shape, bool)
    keep[0, 0, 0] = False  # nothing kept: zeros
    x[0, 0, 1, 3] = np.nan  # a kept NaN: NaN row
    x[0, 0, 2, 3] = np.nan  # a masked NaN: ignored
    keep[0, 0, 2, 3] = False
    x[0, 0, 3] = -np.inf  # all -inf: zeros
    x[0, 0, 4, 7] = np.inf  # a kept +inf: NaN row
    keep[0, 0, 5, ::2] = False
    y = kernel(x, keep=keep, nthreads=nthreads)
    bits = y.view(np.uint16)
    assert np.all(bits[0, 0, [0, 3]] == 0)  # +0, not -0
    assert np.all(bits[0, 0, [1, 4]] == 0x7FC0)  # NaN rows: the quiet NaN
    assert np.all(bits[0, 0, 5, ::2] == 0) and np.all(y[0, 0, 5, 1::2] > 0)
    assert_one_ulp(y, reference(x, keep))


@pytest.mark.parametrize("nthreads", [1, 2])
def test_rounding_of_the_weights(nthreads):
    """A dominant logit: weights of 1 and of exactly representable fractions survive."""
    x = np.zeros((1, 2, 3, 33), BF16)
    x[..., 0] = 80.0  # weight 1 - 32 * e^-80: rounds to 1.0
    x[:, 1, :, 1:] = -np.inf  # one key: exactly 1
    y = kernel(x, nthreads=nthreads)
    assert np.all(y[..., 0] == 1)
    assert_one_ulp(y, reference(x))


@pytest.mark.parametrize("peak", [1e4, 1e20, 3e38])
def test_logits_beyond_float16_range(peak):
    """bfloat16 holds float32's range: huge finite logits give finite weights."""
    x = np.zeros((2, 1, 3, 40), BF16)
    x[..., -1] = peak
    x[0, 0, 1, 5] = -peak
    for scale in (1.0, 1 / np.sqrt(96), 1e-30):
        for nthreads in (1, 2):
            y = kernel(x, scale=scale, nthreads=nthreads)
            assert np.all(np.isfinite(y.astype(np.float32)))
            assert_one_ulp(y, reference(x, scale=scale))


def test_streaming_and_cached_stores_give_the_same_bits(monkeypatch):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 3, 8, 333)) * 3).astype(BF16)
    bounds = rng.integers(0, 333, (2, 3, 8, 2)).astype(np.int64)
    bounds.sort(-1)
    want = [kernel(x, bounds=b).view(np.uint16).copy() for b in (None, bounds)]
    monkeypatch.setattr(ns, "STREAM_MIN_BYTES", 0)
    for nthreads in (1, 2):
        for b, w in zip((None, bounds), want, strict=True):
            np.testing.assert_array_equal(kernel(x, bounds=b, nthreads=nthreads).view(np.uint16), w)


def test_strided_x_and_out_and_in_place():
    rng = np.random.default_rng(4)
    big = (rng.standard_normal((2, 2, 5, 3 * 41)) * 3).astype(BF16)
    x = big[..., ::3]  # a gathered row
    out = np.zeros((2, 2, 5, 2 * 41), BF16)[..., ::-2]  # reversed, strided output
    keep = rng.random((2, 1, 1, 41)) < 0.6
    bias = rng.standard_normal((1, 2, 1, 41)).astype(np.float32)
    y = kernel(x, out, keep=np.broadcast_to(keep, x.shape), bias=np.broadcast_to(bias, x.shape))
    assert y is out
    assert_one_ulp(y, reference(x, keep, bias))
    z = np.ascontiguousarray(x)
    kernel(z, z, keep=np.broadcast_to(keep, x.shape), nthreads=2)
    assert_one_ulp(z, reference(x, keep))


@pytest.mark.parametrize("nthreads", [1, 2])
def test_custom_predicate_and_score(nthreads):
    """The custom kernel variant, compiled for bfloat16 (the row functions are float32's)."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 3, 7, 45)) * 2).astype(BF16)
    shape = x.shape
    pred = masks.predicate(lambda b, h, q, k: (q + k + b) % 3 != 0 and k <= q * 6 + h)
    score = masks.score(lambda s, b, h, q, k: s - 0.05 * abs(q - k))
    keep = np.fromfunction(lambda b, h, q, k: ((q + k + b) % 3 != 0) & (k <= q * 6 + h), shape)
    keep[1, 2, 0] = False  # a dense mask too: a row the two together empty
    dense = np.broadcast_to(keep, shape)
    y = kernel(x, keep=dense, nthreads=nthreads, predicate=pred.plan(shape).predicate)
    assert_one_ulp(y, reference(x, keep))
    assert np.all(y[~keep] == 0) and np.all(y[1, 2, 0] == 0)
    s = score.plan(shape).score
    y = kernel(x, nthreads=nthreads, score=s)
    q_idx = np.arange(shape[2])[:, None]
    k_idx = np.arange(shape[3])[None, :]
    assert_one_ulp(y, reference(x.astype(np.float64) - 0.05 * np.abs(q_idx - k_idx)))
    assert ns.is_compiled(BF16, custom=True)


def test_the_backend_serves_bfloat16_requests():
    """The numba backend's verdict on bfloat16 calls (built by the Python layer, bias in
    float32), and its refusal of dtypes its kernels do not take."""
    from fastmask.backends.numba_backend import NumbaBackend
    from fastmask.request import build_softmax_requests

    x = np.zeros((2, 3, 4, 8), BF16)
    be = NumbaBackend()
    for kw in ({}, {"bias": np.zeros(8, np.float32)}, {"mask": masks.causal()}):
        (req,), _ = build_softmax_requests(x, **kw)
        assert req.dtype == BF16 and req.compute_dtype == np.float32
        assert req.bias4 is None or req.bias4.dtype == np.float32
        assert be.check(req).ok
        be.masked_softmax(req)
        assert req.out4.dtype == BF16

    class Fake:  # a request of a dtype the kernels do not take
        op, dtype = "masked_softmax", np.dtype(ml_dtypes.float8_e4m3fn)

    verdict = be.check(Fake())
    assert not verdict.ok and "bfloat16" in verdict.reason
