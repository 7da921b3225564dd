"""fastmask.attention on every backend against a float64 NumPy reference."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from conftest import BackendsPlugin

import fastmask as fm
from fastmask.attention_request import build_attention_requests
from fastmask.kernels import tiled_attention
from fastmask.reference import masked_softmax_reference

#: Products in float32 accumulate rounding over D terms: looser than masked_softmax's.
TOL = {
    np.dtype(np.float16): {"atol": 2e-3, "rtol": 5e-3},
    np.dtype(ml_dtypes.bfloat16): {"atol": 2e-5, "rtol": 2**-8},  # float32 products, then rounding
    np.dtype(np.float32): {"atol": 1e-5, "rtol": 1e-5},
    np.dtype(np.float64): {"atol": 1e-12, "rtol": 1e-12},
}


def reference(q, k, v, keep=None, bias=None, scale=None):
    """softmax(q k^T * scale + bias, masked) @ v by definition, in float64.

    For grouped-query attention k and v are repeated along the head axis.
    """
    q, k, v = (np.asarray(a).astype(np.float64) for a in (q, k, v))
    if q.ndim >= 3 and k.ndim >= 3 and v.ndim >= 3:
        hq = q.shape[-3]
        hk = max(k.shape[-3], v.shape[-3])
        if hq not in (1, hk) and hk != 1:
            g = hq // hk
            k = np.repeat(k, g, axis=-3) if k.shape[-3] == hk else k
            v = np.repeat(v, g, axis=-3) if v.shape[-3] == hk else v
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = np.matmul(q, np.swapaxes(k, -1, -2))
    w = masked_softmax_reference(scores, keep, bias, scale)
    return np.matmul(w, v), w


def qkv(rng, qshape, kshape, vshape=None, dtype=np.float32):
    vshape = vshape or kshape
    return tuple(rng.standard_normal(s).astype(dtype) for s in (qshape, kshape, vshape))


def check(out, ref, dtype):
    out = np.asarray(out)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.astype(np.float64), ref, **TOL[np.dtype(dtype)])


B, H, LQ, LK, D, DV = 2, 3, 19, 23, 16, 8
SHAPE = (B, H, LQ, LK)
RNG_LEN = np.array([23, 9])


def _masks():
    rng = np.random.default_rng(7)
    dense_rows = rng.random((B, 1, 1, LK)) > 0.3
    dense_full = rng.random(SHAPE) > 0.5
    dense_full[0, 1, 3] = False  # a row with nothing kept
    bias = (rng.standard_normal(SHAPE) * 2).astype(np.float32)
    bias_inf = np.where(rng.random((B, 1, LQ, LK)) > 0.4, 0.0, -np.inf).astype(np.float32)
    bias_inf[1, 0, 2] = -np.inf  # every key -inf for one query
    seg_q = np.repeat(np.arange(4), [5, 5, 5, 4])
    seg_k = np.repeat(np.arange(4), [6, 6, 6, 5])
    seg_scattered = np.arange(LK) % 3
    m = fm.masks
    return {
        "none": (None, None),
        "padding": (m.padding(RNG_LEN), None),
        "padding-zero": (m.padding(np.array([0, 5])), None),
        "padding-left": (m.padding(RNG_LEN, side="left"), None),
        "causal": (m.causal(), None),
        "causal-offset": (m.causal(offset=-2), None),
        "causal-bottom-right": (m.causal(align="bottom-right"), None),
        "sliding": (m.sliding_window(4), None),
        "sliding-symmetric": (m.sliding_window(3, causal=False), None),
        "prefix-lm": (m.prefix_lm(np.array([3, 7])), None),
        "segments": (m.segments(seg_q, seg_k), None),
        "segments-scattered": (m.segments(np.arange(LQ) % 3, seg_scattered), None),
        "keep-rows": (dense_rows, None),
        "keep-full": (m.keep(dense_full), None),
        "drop": (m.drop(~dense_rows), None),
        "bias": (None, bias),
        "bias-inf": (None, bias_inf),
        "causal&padding": (m.causal(align="bottom-right") & m.padding(RNG_LEN), None),
        "sliding&padding-left": (m.sliding_window(5) & m.padding(RNG_LEN, side="left"), None),
        "keep&causal": (m.keep(dense_rows) & m.causal(), None),
        "causal+bias": (m.causal(), bias),
        "prefix&segments+bias-inf": (m.prefix_lm(4) & m.segments(seg_q, seg_k), bias_inf),
    }


MASKS = _masks()


def dense_keep(mask, shape):
    if mask is None:
        return None
    if isinstance(mask, fm.masks.MaskStrategy):
        return mask.to_dense(shape)
    return np.broadcast_to(mask, shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("kind", list(MASKS))
def test_matches_reference(backend, tiles, kind, dtype):
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    q, k, v = qkv(rng, (B, H, LQ, D), (B, H, LK, D), (B, H, LK, DV), dtype)
    mask, bias = MASKS[kind]
    keep = dense_keep(mask, SHAPE)
    out = fm.attention(q, k, v, mask, bias=bias, backend=backend)
    ref, _ = reference(q, k, v, keep, bias)
    check(out, ref, dtype)
    if keep is not None:
        empty = ~keep.any(-1)
        assert np.all(out[empty] == 0), "a query with no kept key must give a zero row"


@pytest.mark.parametrize("kind", ["causal", "padding", "keep-full", "causal+bias", "sliding"])
def test_return_weights_equal_masked_softmax_of_scores(backend, tiles, kind):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (B, H, LQ, D), (B, H, LK, D), (B, H, LK, DV))
    mask, bias = MASKS[kind]
    out, w = fm.attention(q, k, v, mask, bias=bias, scale=0.3, return_weights=True,
                          backend=backend)  # fmt: skip
    scores = np.matmul(q, np.swapaxes(k, -1, -2))
    expected = fm.masked_softmax(scores, mask, bias=bias, scale=0.3, backend="numpy")
    assert w.dtype == np.float32 and w.shape == SHAPE
    np.testing.assert_allclose(w, expected, atol=1e-6, rtol=1e-5)
    keep = dense_keep(mask, SHAPE)
    if keep is not None:
        assert np.all(w[~keep] == 0)
    np.testing.assert_allclose(out, np.matmul(w, v), atol=1e-5, rtol=1e-5)
    out_only = fm.attention(q, k, v, mask, bias=bias, scale=0.3, backend=backend)
    np.testing.assert_allclose(out_only, out, atol=1e-6, rtol=1e-6)


def test_fully_masked_queries_give_zero_rows(backend, tiles):
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, (3, 2, 6, 8), (3, 2, 7, 8))
    keep = np.ones((3, 2, 6, 7), bool)
    keep[0, 1, 2] = False
    keep[2, :, :] = False
    out = fm.attention(q, k, v, keep & fm.masks.padding(np.array([7, 0, 7])).to_dense(keep.shape),
                       backend=backend)  # fmt: skip
    assert np.all(out[1] == 0) and np.all(out[2] == 0) and np.all(out[0, 1, 2] == 0)
    assert np.all(np.abs(out[0, 0]) > 0)
    bias = np.zeros((3, 2, 6, 7), np.float32)
    bias[1, 0, 4] = -np.inf
    out, w = fm.attention(q, k, v, bias=bias, return_weights=True, backend=backend)
    assert np.all(out[1, 0, 4] == 0) and np.all(w[1, 0, 4] == 0)
    assert not np.isnan(out).any()


@pytest.mark.parametrize(
    ("qshape", "kshape"),
    [
        ((2, 6, 9, 8), (2, 2, 11, 8)),  # GQA, group 3
        ((2, 4, 9, 8), (2, 1, 11, 8)),  # MQA
        ((6, 9, 8), (3, 11, 8)),  # 3-D: the head axis is the first one
        ((2, 3, 4, 9, 8), (2, 3, 2, 11, 8)),  # 5-D with GQA
        ((2, 1, 4, 9, 8), (1, 3, 2, 11, 8)),  # 5-D, GQA and broadcasting (split requests)
    ],
)
def test_grouped_query_attention(backend, tiles, qshape, kshape):
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, qshape, kshape)
    batch = np.broadcast_shapes(qshape[:-3], kshape[:-3])
    shape = (*batch, qshape[-3], qshape[-2], kshape[-2])
    mask = fm.masks.causal(align="bottom-right")
    out = fm.attention(q, k, v, mask, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense(shape))
    check(out, ref, np.float32)
    # Head h of q uses kv head h // group, like PyTorch's enable_gqa.
    g = qshape[-3] // kshape[-3]
    j = kshape[-3] - 1  # the last kv head, and the last query head of its group
    one = fm.attention(q[..., j * g + g - 1, :, :], k[..., j, :, :], v[..., j, :, :],
                       mask, backend=backend)  # fmt: skip
    np.testing.assert_allclose(out[..., j * g + g - 1, :, :], one, atol=1e-6, rtol=1e-5)


def test_gqa_does_not_repeat_kv():
    rng = np.random.default_rng(6)
    lk, d = 65536, 64
    q = rng.standard_normal((1, 16, 1, d), dtype=np.float32)
    k = rng.standard_normal((1, 1, lk, d), dtype=np.float32)
    v = rng.standard_normal((1, 1, lk, d), dtype=np.float32)
    fm.attention(q, k, v, backend="cython" if _ok("cython") else None)
    tracemalloc.start()
    try:
        fm.attention(q, k, v, backend="cython" if _ok("cython") else None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * k.nbytes, f"peak {peak} bytes: k/v look repeated per query head"


@pytest.mark.parametrize(
    ("qshape", "kshape", "vshape"),
    [
        ((2, 1, 9, 8), (1, 3, 11, 8), (11, 5)),
        ((9, 8), (11, 8), (11, 4)),
        ((4, 9, 8), (11, 8), (4, 11, 8)),
        ((2, 3, 9, 8), (2, 3, 11, 8), (1, 1, 11, 8)),
    ],
)
def test_leading_axes_broadcast(backend, qshape, kshape, vshape):
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, qshape, kshape, vshape)
    out = fm.attention(q, k, v, backend=backend)
    ref, _ = reference(q, k, v)
    check(out, ref, np.float32)
    lengths = 6
    out = fm.attention(q, k, v, fm.masks.padding(lengths), backend=backend)
    ref, _ = reference(q[..., :, :], k[..., :lengths, :], v[..., :lengths, :])
    check(out, ref, np.float32)


def test_decode_step_long_kv_left_padding(backend, tiles):
    rng = np.random.default_rng(9)
    b, h, hk, lk, d = 4, 8, 2, 4096, 64
    q, k, v = qkv(rng, (b, h, 1, d), (b, hk, lk, d))
    lengths = np.array([4096, 100, 1, 2500])
    mask = fm.masks.padding(lengths, side="left") & fm.masks.causal(align="bottom-right")
    out = fm.attention(q, k, v, mask, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense((b, h, 1, lk)))
    check(out, ref, np.float32)


def test_non_contiguous_inputs(backend, tiles):
    rng = np.random.default_rng(10)
    # (B, L, H, D) layouts viewed as (B, H, L, D), every other feature, reversed keys.
    qb = rng.standard_normal((2, 13, 3, 32), dtype=np.float32)
    kb = rng.standard_normal((2, 17, 3, 32), dtype=np.float32)
    vb = rng.standard_normal((2, 3, 17, 10), dtype=np.float32)
    q = qb.transpose(0, 2, 1, 3)[..., ::2]
    k = kb.transpose(0, 2, 1, 3)[:, :, ::-1, ::2]
    v = vb[:, :, ::-1, ::2]
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    mask = fm.masks.causal(align="bottom-right") & fm.masks.padding(np.array([17, 8]))
    out = fm.attention(q, k, v, mask, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense((2, 3, 13, 17)))
    check(out, ref, np.float32)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16_bit_floats(backend, tiles, dtype):
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, (2, 2, 10, 16), (2, 2, 12, 16), dtype=dtype)
    mask = fm.masks.causal(align="bottom-right")
    out, w = fm.attention(q, k, v, mask, return_weights=True, backend=backend)
    assert out.dtype == dtype and w.dtype == dtype
    ref, ref_w = reference(q, k, v, mask.to_dense((2, 2, 10, 12)))
    check(out, ref, dtype)
    tol = (
        {"atol": 1e-5, "rtol": 2**-8}
        if dtype == ml_dtypes.bfloat16
        else {"atol": 1e-3, "rtol": 2e-3}
    )
    np.testing.assert_allclose(w.astype(np.float64), ref_w, **tol)
    alone = fm.attention(q, k, v, mask, backend=backend)  # the fused engine, where it runs
    check(alone, ref, dtype)


def test_bfloat16_torch_tensors_in_and_out(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    q, k, v = (torch.from_numpy(a) for a in qkv(rng, (2, 4, 9, 16), (2, 2, 11, 16)))
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    mask = fm.masks.padding([11, 6])
    out = fm.attention(qb, kb, vb, mask, backend=backend)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    ref, _ = reference(*(t.float().numpy() for t in (qb, kb, vb)), mask.to_dense((2, 4, 9, 11)))
    check(out.view(torch.int16).numpy().view(ml_dtypes.bfloat16), ref, ml_dtypes.bfloat16)


def test_inputs_not_modified(backend, tiles):
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, (B, H, LQ, D), (B, H, LK, D), (B, H, LK, DV))
    keep = rng.random((B, 1, LQ, LK)) > 0.3
    bias = rng.standard_normal((1, H, 1, LK)).astype(np.float32)
    before = [a.copy() for a in (q, k, v, keep, bias)]
    fm.attention(q, k, v, keep, bias=bias, return_weights=True, backend=backend)
    fm.attention(q, k, v, fm.masks.causal() & fm.masks.keep(keep), bias=bias, backend=backend)
    for a, b in zip((q, k, v, keep, bias), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_read_only_inputs(backend):
    rng = np.random.default_rng(13)
    q, k, v = qkv(rng, (1, 2, 5, 4), (1, 2, 6, 4))
    for a in (q, k, v):
        a.flags.writeable = False
    out = fm.attention(q, k, v, fm.masks.causal(), backend=backend)
    ref, _ = reference(q, k, v, fm.masks.causal().to_dense((1, 2, 5, 6)))
    check(out, ref, np.float32)


def test_scale_default_and_explicit(backend):
    rng = np.random.default_rng(14)
    q, k, v = qkv(rng, (1, 2, 5, 9), (1, 2, 6, 9))
    check(fm.attention(q, k, v, backend=backend), reference(q, k, v, scale=1 / 3)[0], np.float32)
    check(fm.attention(q, k, v, scale=2.0, backend=backend), reference(q, k, v, scale=2.0)[0],
          np.float32)  # fmt: skip


def test_empty_shapes(backend):
    z = np.zeros
    assert fm.attention(z((2, 0, 4), np.float32), z((2, 3, 4), np.float32),
                        z((2, 3, 5), np.float32), backend=backend).shape == (2, 0, 5)  # fmt: skip
    out, w = fm.attention(z((2, 3, 4), np.float32), z((2, 0, 4), np.float32),
                          z((2, 0, 5), np.float32), return_weights=True,
                          backend=backend)  # fmt: skip
    assert out.shape == (2, 3, 5) and np.all(out == 0) and w.shape == (2, 3, 0)


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    q, k, v = qkv(rng, (1, 2, 5, 4), (1, 2, 6, 4))
    out = fm.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                       fm.masks.causal())  # fmt: skip
    assert isinstance(out, torch.Tensor)
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), is_causal=True
    )
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_matches_torch_gqa_and_bool_mask():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    q, k, v = qkv(rng, (2, 8, 12, 16), (2, 2, 12, 16))
    keep = rng.random((2, 1, 12, 12)) > 0.2
    keep[..., 0] = True  # libraries disagree on fully masked rows: keep one key
    t = [torch.from_numpy(a) for a in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *t, attn_mask=torch.from_numpy(keep), enable_gqa=True
    )
    np.testing.assert_allclose(fm.attention(q, k, v, keep), ref.numpy(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- validation


def test_validation_errors():
    rng = np.random.default_rng(17)
    q, k, v = qkv(rng, (2, 4, 5, 8), (2, 4, 6, 8))
    with pytest.raises(TypeError, match="same dtype"):
        fm.attention(q, k.astype(np.float64), v)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fm.attention(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(TypeError, match=r"masks\.keep.*masks\.drop.*bias="):
        fm.attention(q, k, v, np.ones((2, 4, 5, 6), np.float32))
    with pytest.raises(TypeError, match=r"masks\.keep"):
        fm.attention(q, k, v, np.ones((2, 4, 5, 6), np.int8))
    with pytest.raises(ValueError, match="same last axis"):
        fm.attention(q, k[..., :7], v)
    with pytest.raises(ValueError, match="number of keys"):
        fm.attention(q, k, v[..., :5, :])
    with pytest.raises(ValueError, match="multiple"):
        fm.attention(rng.standard_normal((2, 6, 5, 8)).astype(np.float32), k, v)
    with pytest.raises(ValueError, match="multiple"):
        fm.attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="shape"):
        fm.attention(q[0, 0, 0], k, v)
    with pytest.raises(ValueError, match="do not broadcast"):
        fm.attention(q, k[:1].repeat(3, axis=0), v[:1].repeat(3, axis=0))
    with pytest.raises(ValueError, match="broadcast"):
        fm.attention(q, k, v, bias=np.zeros((3, 5, 6), np.float32))
    with pytest.raises(TypeError, match="bias"):
        fm.attention(q, k, v, bias=np.zeros((5, 6), np.int64))
    with pytest.raises(ValueError, match="broadcast"):
        fm.attention(q, k, v, np.ones((3, 1, 5, 6), bool))
    with pytest.raises(ValueError, match="lengths"):
        fm.attention(q, k, v, fm.masks.padding(np.array([1, 2, 3])))
    with pytest.raises(ValueError, match="finite"):
        fm.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="return_weights"):
        fm.attention(q, k, v, return_weights="yes")
    with pytest.raises(ValueError, match="unknown backend"):
        fm.attention(q, k, v, backend="nope")


# ----------------------------------------------------------------- tiling and memory


def _request(q, k, v, mask=None):
    (request,), _, _ = build_attention_requests(q, k, v, mask)
    return request


def test_tiles_skip_masked_work():
    rng = np.random.default_rng(18)
    q, k, v = qkv(rng, (2, 4, 1024, 8), (2, 4, 1024, 8))
    full = 2 * 4 * 1024 * 1024
    causal = tiled_attention.plan_tiles(_request(q, k, v, fm.masks.causal()))
    assert 0.5 <= causal.computed / full <= 0.5 + causal.tq / 1024
    lengths = np.array([1024, 200])
    pad = tiled_attention.plan_tiles(_request(q, k, v, fm.masks.padding(lengths)))
    assert pad.computed == 4 * 1024 * (1024 + 200)
    assert pad.exact.all()  # every row keeps exactly its tile's keys: no per-row bounds
    band = tiled_attention.plan_tiles(_request(q, k, v, fm.masks.sliding_window(64)))
    assert band.computed < 0.2 * full
    none = tiled_attention.plan_tiles(_request(q, k, v, fm.masks.padding(np.array([0, 0]))))
    assert none.computed == 0 and none.tiles == 0
    dense = tiled_attention.plan_tiles(
        _request(q, k, v, np.arange(1024) < lengths[:, None, None, None])
    )
    assert dense.computed == pad.computed  # a dense padding mask is skipped alike


def test_explain_attention():
    rng = np.random.default_rng(19)
    q, k, v = qkv(rng, (1, 4, 256, 16), (1, 4, 256, 16))
    e = fm.explain_attention(q, k, v, fm.masks.causal())
    assert e.chosen in ("cython", "numba")
    text = str(e)
    assert "attention(q: (1, 4, 256, 16) float32" in text and "tiled:" in text
    by_name = {c.name: c for c in e.candidates}
    assert by_name["numpy"].cost > by_name[e.chosen].cost
    assert fm.explain_attention(q, k, v, backend="numpy").chosen == "numpy"
    # The cost counts only the work that is not skipped.
    pad = fm.explain_attention(q, k, v, fm.masks.padding(16))
    assert {c.name: c for c in pad.candidates}[e.chosen].cost < by_name[e.chosen].cost


class _SoftmaxOnly(fm.Backend):
    name = "softmax-only"
    description = "implements masked_softmax only"

    def check(self, request):
        return fm.Verdict(True, "cheapest of all", 0.0)

    def masked_softmax(self, request):
        fm.plugins.backends()["numpy"].masked_softmax(request)


def test_backends_declare_the_ops_they_implement():
    plugin = BackendsPlugin(_SoftmaxOnly())
    fm.plugins.register(plugin, name="softmax-only-plugin")
    try:
        rng = np.random.default_rng(20)
        q, k, v = qkv(rng, (1, 2, 4, 8), (1, 2, 4, 8))
        e = fm.explain_attention(q, k, v)
        verdict = {c.name: c for c in e.candidates}["softmax-only"]
        assert not verdict.ok and "does not implement attention" in verdict.reason
        assert e.chosen != "softmax-only"
        assert fm.explain(q).chosen == "softmax-only"
        with pytest.raises(ValueError, match="does not implement attention"):
            fm.attention(q, k, v, backend="softmax-only")
        check(fm.attention(q, k, v), reference(q, k, v)[0], np.float32)
    finally:
        fm.plugins.unregister(plugin)


def _ok(name):
    backend = fm.plugins.backends().get(name)
    return backend is not None and backend.status()[0]


@pytest.mark.parametrize("name", ["cython", "numba"])
def test_memory_stays_within_the_tile_budget(name):
    if not _ok(name):
        pytest.skip(f"{name} unavailable")
    rng = np.random.default_rng(21)
    lq = lk = 4096
    q, k, v = qkv(rng, (1, 2, lq, 32), (1, 2, lk, 32))
    fm.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], fm.masks.causal(), backend=name)  # warm
    tracemalloc.start()
    try:
        out = fm.attention(q, k, v, fm.masks.causal(), backend=name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    scores_one_head = lq * lk * 4
    assert peak < scores_one_head / 4, f"peak {peak / 2**20:.1f} MiB"
    assert peak < out.nbytes + 2 * tiled_attention.TILE_BYTES + (1 << 20)


@pytest.mark.slow
def test_long_causal_prefill_memory():
    """(1, 16, 8192, 64) float32 causal: the full scores would be 4 GiB; < 1 GB extra."""
    rng = np.random.default_rng(22)
    q, k, v = qkv(rng, (1, 16, 8192, 64), (1, 16, 8192, 64))
    tracemalloc.start()
    try:
        out = fm.attention(q, k, v, fm.masks.causal())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1e9 and peak < 64 << 20, f"peak {peak / 2**20:.1f} MiB"
    rows = [0, 1, 4095, 8191]
    keep = np.arange(8192) <= np.array(rows)[:, None]
    sub_ref, _ = reference(q[0, 3, rows], k[0, 3], v[0, 3], keep)
    np.testing.assert_allclose(out[0, 3, rows], sub_ref, atol=2e-5, rtol=1e-4)


def test_concurrent_calls(backend):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(23)
    cases = [qkv(rng, (2, 4, 70, 16), (2, 2, 90, 16)) for _ in range(4)]
    mask = fm.masks.causal(align="bottom-right") & fm.masks.padding(np.array([90, 33]))
    expected = [fm.attention(*c, mask, backend=backend) for c in cases]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: fm.attention(*c, mask, backend=backend), cases * 3))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, expected[i % 4])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
@pytest.mark.parametrize("mask", [None, "padding", "causal"])
def test_returned_weights_of_a_nan_row_are_nan_at_every_key(backend, dtype, mask):
    """Regression: a row with a NaN kept score was NaN only in its tile's key span."""
    rng = np.random.default_rng(41)
    q, k, v = (rng.standard_normal((2, 3, 5, 8)).astype(dtype) for _ in range(3))
    k[0, 1, 2, 0] = np.nan  # every query row that keeps key 2 of (b=0, h=1) is NaN
    strategy = {None: None, "padding": fm.masks.padding([4, 5]), "causal": fm.masks.causal()}
    out, w = fm.attention(q, k, v, strategy[mask], return_weights=True, backend=backend)
    scores = (q.astype(np.float64) @ np.swapaxes(k, -1, -2)).astype(dtype)
    ref = fm.masked_softmax(scores, strategy[mask], scale=1 / np.sqrt(8), backend="numpy")
    np.testing.assert_array_equal(np.isnan(w), np.isnan(ref))
    assert np.isnan(w[0, 1]).any() and not np.isnan(w[1]).any()
    np.testing.assert_array_equal(np.isnan(out).all(-1), np.isnan(ref).all(-1))
