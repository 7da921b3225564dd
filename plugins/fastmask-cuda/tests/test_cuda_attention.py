"""``fm.attention`` on the device against the NumPy reference: every mask kind, dtype, layout.

Tiny shapes: under the simulator every CUDA thread is a Python thread. There the
blocks have 32 threads instead of 128 (the kernel's logic is the same for any
number of threads per row, and it is about ten times faster);
``test_production_launch_shape`` runs the configuration a GPU gets.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmask as fm
from fastmask import router
from fastmask_cuda import flash

from cuda_helpers import (
    SIMULATED,
    attention_reference,
    check_attention,
    dev,
    dev_stored_as,
    dev_view,
    host,
)

pytestmark = pytest.mark.usefixtures("cuda_plugin")

B, H, LQ, LK, D, DV = 2, 2, 5, 8, 8, 4
SHAPE = (B, H, LQ, LK)  # the scores


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    if SIMULATED:
        monkeypatch.setattr(flash, "THREADS_TARGET", 32)


def qkv(rng, qshape=(B, H, LQ, D), kshape=(B, H, LK, D), vshape=(B, H, LK, DV), dtype=np.float32):
    return tuple(rng.standard_normal(s).astype(dtype) for s in (qshape, kshape, vshape))


def _masks():
    """name -> (mask, bias, dense keep for the reference); device operands marked by name."""
    rng = np.random.default_rng(7)
    rows = rng.random((B, 1, 1, LK)) < 0.6
    full = rng.random(SHAPE) < 0.5
    full[0, 1, 3] = False  # a query that keeps nothing
    bias = (rng.standard_normal(SHAPE) * 2).astype(np.float32)
    bias_inf = np.where(rng.random((B, 1, LQ, LK)) < 0.6, 0.0, -np.inf)
    bias_inf[1, 0, 2] = -np.inf  # every key -inf for one query: a zero row
    seg_q, seg_k = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 1, 1, 2, 2, 2])
    scattered = np.array([0, 1, 0, 1, 2, 2, 0, 1])
    m = fm.masks
    masks = {
        "none": (None, None),
        "padding": (m.padding([5, 0]), None),
        "padding-left": (m.padding([3, 8], side="left"), None),
        "causal": (m.causal(), None),
        "causal-offset": (m.causal(offset=-2), None),
        "causal-bottom-right": (m.causal(align="bottom-right"), None),
        "sliding": (m.sliding_window(2), None),
        "sliding-band": (m.sliding_window(3, causal=False, align="bottom-right"), None),
        "segments": (m.segments(seg_q, seg_k), None),
        "segments-scattered": (m.segments(seg_q, scattered), None),
        "prefix_lm": (m.prefix_lm([4, 1]), None),
        "keep": (m.keep(rows), None),
        "drop": (m.drop(~rows), None),
        "bool-array": (full, None),
        "bool-device-array": ("device", None),
        "bias": (None, bias),
        "bias-inf-device": (None, "device"),
        "padding&causal": (m.padding([6, 3]) & m.causal(offset=2), None),
        "keep&sliding": (m.keep(rows) & m.sliding_window(4), None),
        "causal+bias": (m.causal(align="bottom-right"), bias),
        "prefix&segments+bias-inf": (m.prefix_lm(4) & m.segments(seg_q, seg_k), bias_inf),
    }
    return masks, full, bias_inf


MASKS, FULL, BIAS_INF = _masks()


def _operands(kind):
    """``(mask, bias)`` as passed to attention, and ``(keep, bias)`` for the reference."""
    mask, bias = MASKS[kind]
    if isinstance(mask, str):
        mask, keep = dev(FULL), FULL
    elif isinstance(mask, fm.masks.MaskStrategy):
        keep = mask.to_dense(SHAPE)
    else:
        keep = mask
    if isinstance(bias, str):
        bias, ref_bias = dev(BIAS_INF), BIAS_INF
    else:
        ref_bias = bias
    return mask, bias, keep, ref_bias


@pytest.mark.parametrize("kind", list(MASKS))
def test_every_mask_kind_float32(kind, rng):
    q, k, v = qkv(rng)
    mask, bias, keep, ref_bias = _operands(kind)
    out = fm.attention(dev(q), dev(k), dev(v), mask, bias=bias)
    check_attention(out, q, k, v, keep, ref_bias)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kind", ["none", "padding&causal", "bool-device-array", "causal+bias"])
def test_dtypes_with_weights(kind, dtype, rng):
    q, k, v = qkv(rng, dtype=dtype)
    mask, bias, keep, ref_bias = _operands(kind)
    res = fm.attention(dev(q), dev(k), dev(v), mask, bias=bias, scale=0.3, return_weights=True)
    assert isinstance(res, tuple) and len(res) == 2
    check_attention(res, q, k, v, keep, ref_bias, scale=0.3)


@pytest.mark.parametrize("kind", ["segments-scattered", "sliding-band", "keep", "bias-inf-device"])
def test_weights_of_more_mask_kinds(kind, rng):
    q, k, v = qkv(rng)
    mask, bias, keep, ref_bias = _operands(kind)
    res = fm.attention(dev(q), dev(k), dev(v), mask, bias=bias, return_weights=True)
    check_attention(res, q, k, v, keep, ref_bias)


def test_grouped_query_attention_and_broadcast_kv(rng):
    mask = fm.masks.causal(align="bottom-right")
    q, k, v = qkv(rng, (1, 4, LQ, D), (1, 2, LK, D), (1, 2, LK, DV))  # 2 query heads per kv head
    res = fm.attention(dev(q), dev(k), dev(v), mask, return_weights=True)
    check_attention(res, q, k, v, mask.to_dense((1, 4, LQ, LK)))

    q, k, v = qkv(rng, (4, LQ, D), (2, LK, D), (2, LK, DV))  # 3-D: the heads are axis 0
    check_attention(fm.attention(dev(q), dev(k), dev(v)), q, k, v)

    q, k, v = qkv(rng, (2, 2, LQ, D), (1, 2, LK, D), (2, 1, LK, DV))  # k and v broadcast
    check_attention(fm.attention(dev(q), dev(k), dev(v), mask), q, k, v,
                    mask.to_dense((2, 2, LQ, LK)))  # fmt: skip


def test_ragged_tiles(rng, monkeypatch):
    """Tiles of 2 queries x 3 keys over 5 x 8 scores: short last tiles on both axes,
    key tiles skipped by the causal mask, D and Dv narrower than the tiles."""
    real = flash.launch_config

    def tiny(lq, d, dv, itemsize, threads_target):
        c = real(lq, d, dv, itemsize, threads_target)
        return flash.FlashConfig(c.d_class, c.bq_max, c.bk_max, 2, 3, 2, 4)

    monkeypatch.setattr(flash, "launch_config", tiny)
    q, k, v = qkv(rng, (1, 2, LQ, 5), (1, 2, LK, 5), (1, 2, LK, 3))
    mask = fm.masks.causal() & fm.masks.padding([7])
    bias = (rng.standard_normal((1, 1, LQ, LK))).astype(np.float32)
    res = fm.attention(dev(q), dev(k), dev(v), mask, bias=bias, return_weights=True)
    check_attention(res, q, k, v, mask.to_dense((1, 2, LQ, LK)), bias)


def test_production_launch_shape(rng, monkeypatch):
    """The configuration a GPU gets (128 threads per block here: 8 rows x 16 threads)."""
    monkeypatch.setattr(flash, "THREADS_TARGET", 128)
    q, k, v = qkv(rng, (1, 1, LQ, D), (1, 1, LK, D), (1, 1, LK, DV))
    mask = fm.masks.sliding_window(3)
    e = fm.explain_attention(dev(q), dev(k), dev(v), mask)
    assert "8 queries x 32 keys" in str(e) and "of 128 threads" in str(e)
    res = fm.attention(dev(q), dev(k), dev(v), mask, return_weights=True)
    check_attention(res, q, k, v, mask.to_dense((1, 1, LQ, LK)))


def test_strided_views_and_split_requests(rng):
    q, k, v = qkv(rng)
    # (B, L, H, D) memory viewed as (B, H, L, D), and a sliced k.
    qv = dev_stored_as(q, (0, 2, 1, 3))
    kbig = rng.standard_normal((B, H, LK, 2 * D)).astype(np.float32)
    kv_ = dev_view(dev(kbig), (slice(None), slice(None), slice(None), slice(None, None, 2)))
    out = fm.attention(qv, kv_, dev_stored_as(v, (2, 0, 1, 3)), fm.masks.causal())
    check_attention(out, q, kbig[..., ::2], v, fm.masks.causal().to_dense(SHAPE))

    # 5-D: k and v broadcast along axis 1 do not fold into one head axis: split.
    q, k, v = qkv(rng, (1, 2, 2, LQ, D), (1, 1, 2, LK, D), (1, 1, 2, LK, DV))
    mask = fm.masks.causal()
    res = fm.attention(dev(q), dev(k), dev(v), mask, return_weights=True)
    check_attention(res, q, k, v, mask.to_dense((1, 2, 2, LQ, LK)))


def test_special_values(rng):
    q, k, v = qkv(rng, (1, 1, 4, D), (1, 1, LK, D), (1, 1, LK, DV))
    q[0, 0, 1, 2] = np.nan  # a NaN query: its row (and weights) NaN
    bias = np.zeros((1, 1, 4, LK), np.float32)
    bias[0, 0, 2] = -np.inf  # every key -inf: a zero row
    bias[0, 0, 3, :4] = -np.inf
    dq = dev(q)
    out, w = fm.attention(dq, dev(k), dev(v), bias=bias, return_weights=True)
    check_attention((out, w), q, k, v, bias=bias)
    o, ww = host(out), host(w)
    assert np.isnan(o[0, 0, 1]).all() and np.isnan(ww[0, 0, 1]).all()
    assert (o[0, 0, 2] == 0).all() and (ww[0, 0, 2] == 0).all()
    assert not np.isnan(o[0, 0, [0, 2, 3]]).any()
    np.testing.assert_array_equal(host(dq), q)  # the input is not modified


@pytest.mark.parametrize(
    ("qshape", "kshape", "vshape"),
    [
        ((1, 2, 0, D), (1, 2, LK, D), (1, 2, LK, DV)),  # no query
        ((1, 2, LQ, D), (1, 2, 0, D), (1, 2, 0, DV)),  # no key: zero rows
        ((0, 2, LQ, D), (0, 2, LK, D), (0, 2, LK, DV)),  # no batch
        ((1, 1, 3, 0), (1, 1, 4, 0), (1, 1, 4, 2)),  # D = 0: uniform weights
        ((1, 1, 3, D), (1, 1, 4, D), (1, 1, 4, 0)),  # Dv = 0: only the weights
    ],
)
def test_empty_shapes(qshape, kshape, vshape, rng):
    q, k, v = qkv(rng, qshape, kshape, vshape)
    res = fm.attention(dev(q), dev(k), dev(v), fm.masks.causal(), return_weights=True)
    check_attention(res, q, k, v, fm.masks.causal().to_dense((*qshape[:-1], kshape[-2])))


def test_head_dims_up_to_256_and_wider_declined(rng):
    q, k, v = qkv(rng, (1, 1, 2, 40), (1, 1, 3, 40), (1, 1, 3, 70))  # class 128, Dv != D
    check_attention(fm.attention(dev(q), dev(k), dev(v), fm.masks.causal()), q, k, v,
                    fm.masks.causal().to_dense((1, 1, 2, 3)))  # fmt: skip
    q, k, v = qkv(rng, (1, 1, 2, 300), (1, 1, 3, 300), (1, 1, 3, 4))
    e = fm.explain_attention(dev(q), dev(k), dev(v))
    cuda_c = next(c for c in e.candidates if c.name == "cuda")
    assert not cuda_c.ok and "head dimensions D=300" in cuda_c.reason
    with pytest.raises(ValueError, match="no backend can serve"):
        fm.attention(dev(q), dev(k), dev(v))


# -- routing -------------------------------------------------------------------------------


def test_device_arrays_route_to_cuda_and_stay_on_the_device(rng):
    q, k, v = qkv(rng)
    dq, dk, dv_ = dev(q), dev(k), dev(v)
    e = fm.explain_attention(dq, dk, dv_, fm.masks.causal(), return_weights=True)
    assert e.chosen == "cuda" and not e.forced
    why = {c.name: c.reason for c in e.candidates}
    assert why["numpy"] == "does not implement attention_device"
    assert "on device" in str(e) and "return_weights=True" in str(e)
    out, w = fm.attention(dq, dk, dv_, fm.masks.causal(), return_weights=True)
    for a in (out, w):
        assert hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)
        if not SIMULATED:
            assert type(a).__name__ == "DeviceNDArray"
    check_attention((out, w), q, k, v, fm.masks.causal().to_dense(SHAPE))


def test_host_arrays_do_not_route_to_cuda_unless_forced(cuda_plugin, rng):
    q, k, v = qkv(rng)
    e = fm.explain_attention(q, k, v)
    assert e.chosen != "cuda"
    cuda_c = next(c for c in e.candidates if c.name == "cuda")
    assert cuda_c.ok and "never chosen automatically" in cuda_c.reason
    assert cuda_c.cost >= cuda_plugin.HOST_PENALTY_US
    assert fm.explain_attention(q, k, v, backend="cuda").chosen == "cuda"
    assert isinstance(fm.attention(q, k, v), np.ndarray)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_forced_host_arrays(dtype, rng):
    q, k, v = qkv(rng, (B, 4, LQ, D), (B, 2, LK, D), (B, 2, LK, DV), dtype)  # GQA too
    mask = fm.masks.keep(np.random.default_rng(1).random((B, 1, 1, LK)) < 0.7) & fm.masks.causal()
    bias = rng.standard_normal((1, 1, LQ, LK)).astype(np.float32)
    out, w = fm.attention(q, k, v, mask, bias=bias, return_weights=True, backend="cuda")
    assert isinstance(out, np.ndarray) and isinstance(w, np.ndarray)
    assert out.dtype == w.dtype == dtype
    ref_o, ref_w = attention_reference(q, k, v, mask.to_dense((B, 4, LQ, LK)), bias)
    tol = {"atol": 2e-3, "rtol": 5e-3} if dtype == np.float16 else {"atol": 1e-12, "rtol": 1e-12}
    np.testing.assert_allclose(out.astype(np.float64), ref_o, **tol)
    np.testing.assert_allclose(w.astype(np.float64), ref_w, **tol)


def test_mixed_host_and_device_operands_are_a_type_error(rng):
    q, k, v = qkv(rng)
    with pytest.raises(TypeError, match="k and v are on the host"):
        fm.attention(dev(q), k, v)
    with pytest.raises(TypeError, match="q is on the host"):
        fm.explain_attention(q, dev(k), dev(v))


def test_cpu_backend_cannot_be_forced_on_device_arrays(rng):
    q, k, v = (dev(a) for a in qkv(rng))
    with pytest.raises(ValueError, match="does not implement attention_device"):
        fm.attention(q, k, v, backend="numba")


def test_unavailable_gpu_is_explained_and_never_chosen(cuda_plugin, monkeypatch, rng):
    note = "no CUDA driver (libcuda) on this machine, so no GPU"
    monkeypatch.setattr(cuda_plugin, "status", lambda: (False, note))
    router.invalidate()
    try:
        q, k, v = qkv(rng)
        cuda_c = next(c for c in fm.explain_attention(q, k, v).candidates if c.name == "cuda")
        assert not cuda_c.ok and cuda_c.reason == note
        with pytest.raises(ValueError, match="no CUDA driver"):
            fm.attention(q, k, v, backend="cuda")
        dq, dk, dv_ = dev(q), dev(k), dev(v)
        assert fm.explain_attention(dq, dk, dv_).chosen is None
        with pytest.raises(ValueError, match="no backend can serve"):
            fm.attention(dq, dk, dv_)
    finally:
        monkeypatch.undo()
        router.invalidate()


def test_validation_matches_host_rules(rng):
    q, k, v = (dev(a) for a in qkv(rng))
    with pytest.raises(TypeError, match="same dtype"):
        fm.attention(q, k, dev(np.zeros((B, H, LK, DV), np.float64)))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fm.attention(dev(np.zeros((2, 3), np.int32)), k, v)
    with pytest.raises(TypeError, match=r"masks\.keep"):
        fm.attention(q, k, v, dev(np.ones(SHAPE, np.float32)))
    with pytest.raises(ValueError, match="same last axis D"):
        fm.attention(q, dev(np.zeros((B, H, LK, D + 1), np.float32)), v)
    with pytest.raises(ValueError, match="multiple"):
        fm.attention(dev(np.zeros((B, 3, LQ, D), np.float32)), k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        fm.attention(q, k, v, bias=dev(np.zeros((3, LK), np.float32)))
    with pytest.raises(ValueError, match="does not broadcast"):
        fm.attention(q, k, v, dev(np.ones((4, LK), bool)))
    with pytest.raises(ValueError, match="finite"):
        fm.attention(q, k, v, scale=np.nan)
    with pytest.raises(TypeError, match="return_weights"):
        fm.attention(q, k, v, return_weights=1)


def test_kernels_compile_once_per_variant_not_per_shape(rng):
    mask = fm.masks.keep(np.ones((1, LK), bool))
    for qs, ks in [((2, LQ, D), (2, LK, D)), ((1, 3, 4, 6), (1, 3, LK, 6))]:
        q, k, _ = qkv(rng, qs, ks, ks, np.float64)
        fm.attention(dev(q), dev(k), dev(k), mask)
    assert ("d", True, None, 32) in flash.compiled_variants()
    misses = flash.kernel.cache_info().misses
    q, k, _ = qkv(rng, (3, 7, 2), (3, LK, 2), (3, LK, 2), np.float64)
    fm.attention(dev(q), dev(k), dev(k), mask)
    assert flash.kernel.cache_info().misses == misses


def test_launch_configuration():
    for dc in flash.D_CLASSES:
        for itemsize in (4, 8):
            bq, bk = flash.tile_capacity(dc, itemsize)
            assert flash.shared_bytes(dc, bq, bk, itemsize) <= flash.SHARED_BUDGET
    assert flash.tile_capacity(64, 4) == (32, 32)
    big = flash.launch_config(1024, 64, 64, 4)  # prefill: 32 rows x 4 threads
    assert (big.d_class, big.bq, big.bk, big.tpr, big.threads) == (64, 32, 32, 4, 128)
    assert big.blocks(2, 8, 1000) == 2 * 8 * 32
    decode = flash.launch_config(1, 128, 128, 4)  # one row per block, one warp
    assert (decode.bq, decode.tpr, decode.threads) == (1, 32, 32)
    wide = flash.launch_config(512, 256, 256, 4)
    assert wide.tpr * flash.ACC_MAX >= 256 and wide.threads == wide.bq * wide.tpr
    assert flash.launch_config(8, 257, 8, 4) is None
    assert flash.launch_config(1024, 64, 64, 4) is big  # cached per shape class
