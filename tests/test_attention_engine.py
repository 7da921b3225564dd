"""The cases that stress the fused attention engine (``fastmask/_attention_engine.h``),
run on every backend against the float64 reference: block and lane boundaries, GQA
packing, decode with split keys, NaN/inf rows; and, for the engine alone, results
that do not depend on the thread count or the ISA variant."""

from __future__ import annotations

import numpy as np
import pytest
from test_attention import check, dense_keep, qkv, reference

import fastmask as fm
from fastmask.kernels import fused_attention

m = fm.masks

# Query/key lengths around the engine's blocks (64 keys, 16-lane row vectors, items of
# 64 rows, 16-key groups of the decode path).
LENGTHS = [(1, 1), (1, 65), (3, 1030), (15, 17), (63, 64), (64, 63), (65, 129), (130, 200)]


def _mask(kind, b, lq, lk, rng):
    if kind == "none":
        return None, None
    if kind == "causal-br":
        return m.causal(align="bottom-right"), None
    if kind == "window":
        return m.sliding_window(20), None
    if kind == "padding":
        return m.padding(rng.integers(0, lk + 1, b)), None
    if kind == "keep+bias":
        keep = rng.random((b, 1, lq, lk)) > 0.3
        bias = (rng.standard_normal((1, 1, lq, lk)) * 2).astype(np.float32)
        return keep, bias
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["none", "causal-br", "window", "padding", "keep+bias"])
@pytest.mark.parametrize(("lq", "lk"), LENGTHS)
def test_block_boundaries(backend, lq, lk, kind):
    rng = np.random.default_rng(lq * 1000 + lk)
    b, h = 2, 3
    d, dv = (64, 64) if lk % 2 else (40, 24)  # the decode path and the general one
    q, k, v = qkv(rng, (b, h, lq, d), (b, h, lk, d), (b, h, lk, dv))
    mask, bias = _mask(kind, b, lq, lk, rng)
    out = fm.attention(q, k, v, mask, bias=bias, backend=backend)
    ref, _ = reference(q, k, v, dense_keep(mask, (b, h, lq, lk)), bias)
    check(out, ref, np.float32)


@pytest.mark.parametrize("group", [1, 2, 4, 8, 16, 80])
@pytest.mark.parametrize("lq", [1, 37])
def test_gqa_groups(backend, group, lq):
    """Every head of a group in one item (80 > 64 rows: split into pieces)."""
    rng = np.random.default_rng(group + lq)
    hk, lk, d = 2, 90, 32
    q, k, v = qkv(rng, (1, hk * group, lq, d), (1, hk, lk, d))
    mask = m.causal(align="bottom-right") & m.padding(np.array([77]))
    out = fm.attention(q, k, v, mask, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense((1, hk * group, lq, lk)))
    check(out, ref, np.float32)


@pytest.mark.parametrize("with_bias", [False, True])
def test_decode_split_keys_left_padding(backend, with_bias):
    """Few long rows: the engine cuts each item's keys into pieces and merges them."""
    rng = np.random.default_rng(5)
    b, hk, g, lk, d = 3, 1, 4, 3000, 64
    q, k, v = qkv(rng, (b, hk * g, 1, d), (b, hk, lk, d))
    mask = m.padding(np.array([3000, 700, 0]), side="left")  # the last: nothing kept
    bias = (rng.standard_normal((b, 1, 1, lk)) * 3).astype(np.float32) if with_bias else None
    if backend == "cython":
        explain = fm.explain_attention(q, k, v, mask, bias=bias, backend="cython")
        assert "split" in explain.candidates[0].reason
    out = fm.attention(q, k, v, mask, bias=bias, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense((b, hk * g, 1, lk)), bias)
    check(out, ref, np.float32)
    assert np.all(out[2] == 0)


@pytest.mark.parametrize("offset", [1e3, 1e5, 1e7, 2.0**30, -1e9])
@pytest.mark.parametrize(
    "shapes",
    [((1, 2, 70, 16), (1, 2, 150, 16)),  # rows in lanes, several key blocks
     ((3, 4, 1, 64), (3, 1, 3000, 64))],  # decode rows, keys split across threads
    ids=["tile", "decode-split"],
)  # fmt: skip
def test_a_bias_that_shares_a_large_offset(backend, shapes, offset):
    """A bias whose kept values share a large offset (a common constant, TensorFlow's
    -1e9 on a whole padding row) leaves the weights softmax(q k^T * scale + rest), as
    in float64: the offset is not rounded into the float32 scores."""
    rng = np.random.default_rng(21)
    q, k, v = qkv(rng, *shapes)
    b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    bias = (offset + rng.standard_normal((b, 1, lq, lk)) * 2).astype(np.float32)
    bias[..., ::7] = -1e9  # masked keys beside the offset ones
    if lq > 1:
        bias[0, 0, 3] = -1e9  # a whole row of -1e9: the offset, shared
    keep = rng.random((b, 1, lq, lk)) < 0.8
    keep[..., 0] = False  # the row's first key is masked: the offset ignores it
    bias[..., 0] = 1e30
    mask = m.padding(np.array([lk, lk // 3, lk - 5][:b]), side="left") & m.keep(keep)
    out = fm.attention(q, k, v, mask, bias=bias, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense((*q.shape[:-1], lk)), bias)
    check(out, ref, np.float32)


def test_nan_and_inf_rows(backend):
    """A kept NaN or +inf score makes its row NaN (in whichever key block or split
    piece it falls); a NaN at a masked key changes nothing; -inf everywhere: zeros."""
    rng = np.random.default_rng(9)
    lk, d = 2100, 16
    q = np.abs(rng.standard_normal((1, 4, 3, d))).astype(np.float32)
    k = np.abs(rng.standard_normal((1, 4, lk, d))).astype(np.float32)
    v = rng.standard_normal((1, 4, lk, 8)).astype(np.float32)
    k[0, 0, 1500, 3] = np.nan  # head 0: a kept NaN key, late in the row
    k[0, 1, 2050, 0] = np.nan  # head 1: a NaN key past the padding: masked
    k[0, 2, 700, 0] = np.inf  # head 2: a kept +inf score
    bias = np.zeros((1, 4, 3, lk), np.float32)
    bias[0, 3, 1] = -np.inf  # head 3, query 1: every key -inf
    mask = m.padding(np.array([2000]))
    out = fm.attention(q, k, v, mask, bias=bias, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense((1, 4, 3, lk)), bias)
    assert np.isnan(out[0, 0]).all() and np.isnan(out[0, 2]).all()
    assert not np.isnan(out[0, 1]).any()
    assert np.all(out[0, 3, 1] == 0)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("lq", [1, 70])
def test_dtypes(backend, dtype, lq):
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, (2, 8, lq, 64), (2, 2, 150, 64), dtype=dtype)
    mask = m.causal(align="bottom-right") & m.padding(np.array([150, 61]))
    out = fm.attention(q, k, v, mask, backend=backend)
    ref, _ = reference(q, k, v, mask.to_dense((2, 8, lq, 150)))
    check(out, ref, dtype)


def _engine_cases():
    rng = np.random.default_rng(13)
    yield qkv(rng, (2, 8, 150, 64), (2, 8, 150, 64)), m.causal()
    yield qkv(rng, (4, 8, 1, 64), (4, 2, 700, 64)), m.padding(np.array([700, 9, 0, 400]))
    yield qkv(rng, (1, 4, 1, 64), (1, 1, 4000, 64)), m.padding(np.array([3500]), side="left")
    yield qkv(rng, (1, 2, 300, 40), (1, 2, 300, 40), (1, 2, 300, 24)), m.sliding_window(33)


@pytest.mark.filterwarnings("ignore:set_num_threads.*available CPU")  # 3 on 2 CPUs: meant
def test_results_do_not_depend_on_the_thread_count():
    outs = {}
    try:
        for n in (1, 2, 3):
            fm.set_num_threads(n)
            outs[n] = [fm.attention(*c, mk, backend="cython") for c, mk in _engine_cases()]
    finally:
        fm.set_num_threads(None)
    for n in (2, 3):
        for a, b in zip(outs[1], outs[n], strict=True):
            np.testing.assert_array_equal(a, b)


def test_every_isa_variant_matches_the_reference():
    kernels = pytest.importorskip("fastmask._kernels")
    variants = kernels.build_info()["isa_available"]
    cases = list(_engine_cases())
    try:
        for name in variants:
            kernels._set_isa(name)
            for (q, k, v), mk in cases:
                for dtype in (np.float32, np.float64):
                    qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
                    out = fm.attention(qd, kd, vd, mk, backend="cython")
                    shape = (*out.shape[:-1], k.shape[-2])
                    ref, _ = reference(qd, kd, vd, mk.to_dense(shape))
                    check(out, ref, dtype)
    finally:
        kernels._set_isa(None)


def test_explain_names_the_engine_and_the_skipped_blocks():
    rng = np.random.default_rng(17)
    q, k, v = qkv(rng, (1, 4, 512, 64), (1, 4, 512, 64))
    reason = fm.explain_attention(q, k, v, m.causal(), backend="cython").candidates[0].reason
    assert reason.startswith("fused engine") and "skipped by the mask" in reason
    plan = fused_attention.plan(
        fm.attention_request.build_attention_requests(q, k, v, m.causal())[0][0],
        pytest.importorskip("fastmask._kernels"),
    )
    assert plan.skipped > 0 and plan.blocks + plan.skipped == plan.items * 8
    weights = fm.explain_attention(q, k, v, m.causal(), return_weights=True, backend="cython")
    assert weights.candidates[0].reason.startswith("tiled")


def test_recycled_outputs_are_not_shared():
    """Large outputs come from fastmask's pool: a result still held is never reused."""
    rng = np.random.default_rng(19)
    q, k, v = qkv(rng, (4, 8, 256, 64), (4, 8, 256, 64))
    first = fm.attention(q, k, v, m.causal(), backend="cython")
    kept = first.copy()
    second = fm.attention(q * 2, k, v, m.causal(), backend="cython")
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)
    assert np.all(fm.attention(q, k, v, m.padding(np.zeros(4, int)), backend="cython") == 0)


# ------------------------------------------------- user predicates and score functions


def _user_reference(q, k, v, keep_fn=None, score_fn=None, mask=None, bias=None):
    """The float64 reference with the user functions evaluated in Python, by definition:
    scores (..., Lq, Lk) indexed as masked_softmax indexes them (b: first axis when
    there are three or more, h: the flat index of the axes between it and Lq)."""
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    if q64.ndim >= 3 and k64.shape[-3] != q64.shape[-3]:  # GQA: repeat the kv heads
        g = q64.shape[-3] // k64.shape[-3]
        k64, v64 = np.repeat(k64, g, axis=-3), np.repeat(v64, g, axis=-3)
    z = q64 @ np.swapaxes(k64, -1, -2) / np.sqrt(q.shape[-1])
    if bias is not None:
        z = z + bias
    shape = z.shape
    b_, h_ = (shape[0], int(np.prod(shape[1:-2]))) if z.ndim >= 3 else (1, 1)
    z4 = z.reshape(b_, h_, *shape[-2:])
    keep = np.ones(z4.shape, bool) if mask is None else dense_keep(mask, shape).reshape(z4.shape)
    for b, h, i, j in np.ndindex(*z4.shape):
        if score_fn is not None:
            z4[b, h, i, j] = score_fn(z4[b, h, i, j], b, h, i, j)
        if keep_fn is not None:
            keep[b, h, i, j] &= keep_fn(b, h, i, j)
    z4 = np.where(keep, z4, -np.inf)
    mx = z4.max(-1, keepdims=True)
    e = np.exp(z4 - np.where(np.isfinite(mx), mx, 0))
    total = e.sum(-1, keepdims=True)
    w = np.divide(e, total, out=np.zeros_like(e), where=total > 0).reshape(shape)
    return w @ v64, w


def _every_third(b, h, i, j):
    return (i + 2 * j + b + h) % 3 != 0


def _alibi(s, b, h, i, j):
    return s - 0.25 * (h + 1) * abs(i - j)


USER_CASES = {
    "predicate": ((2, 3, 70, 32), (2, 3, 130, 32), _every_third, None, None),
    "predicate&causal": ((2, 3, 70, 32), (2, 3, 70, 32), _every_third, None, "causal-br"),
    "score": ((2, 3, 70, 32), (2, 3, 90, 32), None, _alibi, None),
    "both&window": ((2, 3, 70, 32), (2, 3, 70, 32), _every_third, _alibi, "window"),
    "score&padding+bias": ((2, 3, 33, 32), (2, 3, 90, 32), None, _alibi, "padding"),
    "both, GQA decode": ((2, 8, 1, 64), (2, 2, 1500, 64), _every_third, _alibi, "padding"),
    "both, 3-D": ((3, 40, 16), (3, 50, 16), _every_third, _alibi, None),
}


@pytest.mark.parametrize("weights", [False, True], ids=["out", "weights"])
@pytest.mark.parametrize("case", list(USER_CASES))
def test_user_functions_in_attention(backend, tiles, case, weights):
    """The fused engine (cython), the tiled driver (numba; with tiny tiles the
    functions see tiles' rows at non-zero query and key offsets) and the reference."""
    qshape, kshape, keep_fn, score_fn, kind = USER_CASES[case]
    rng = np.random.default_rng(len(case))
    q, k, v = qkv(rng, qshape, kshape)
    mask = None
    bias = None
    if kind == "causal-br":
        mask = m.causal(align="bottom-right")
    elif kind == "window":  # tiles of later queries start past key 0
        mask = m.sliding_window(20)
    elif kind == "padding":
        mask = m.padding(np.array([kshape[-2], kshape[-2] // 3]))
        if "bias" in case:
            bias = (rng.standard_normal((qshape[0], 1, 1, kshape[-2])) * 2).astype(np.float32)
    strategy = mask
    for part in ([m.predicate(keep_fn)] if keep_fn else []) + (
        [m.score(score_fn)] if score_fn else []
    ):
        strategy = part if strategy is None else strategy & part
    verdict = fm.explain_attention(
        q, k, v, strategy, bias=bias, return_weights=weights, backend=None
    )
    mine = next(c for c in verdict.candidates if c.name == backend)
    if not mine.ok:
        assert "predicates and score functions" in mine.reason
        pytest.skip(f"{backend}: {mine.reason}")
    got = fm.attention(q, k, v, strategy, bias=bias, return_weights=weights, backend=backend)
    ref, ref_w = _user_reference(q, k, v, keep_fn, score_fn, mask, bias)
    np.testing.assert_allclose(got[0] if weights else got, ref, atol=2e-5, rtol=2e-5)
    if weights:
        np.testing.assert_allclose(got[1], ref_w, atol=2e-6, rtol=2e-5)


def test_return_weights_with_user_functions_run_compiled():
    """return_weights=True with a predicate: the numba tiled driver, not the reference."""
    pytest.importorskip("numba")
    q, k, v = qkv(np.random.default_rng(3), (1, 2, 40, 16), (1, 2, 40, 16))
    verdict = fm.explain_attention(q, k, v, m.predicate(_every_third), return_weights=True)
    assert verdict.chosen == "numba"


@pytest.mark.parametrize(
    ("route", "weights"), [("cython", False), ("numba", False), ("numba", True)]
)
def test_user_function_errors_name_the_row(tiles, route, weights):
    def boom(b, h, i, j):
        if b == 1 and h == 2 and i == 5 and j == 7:
            raise ValueError("no such token")
        return True

    pytest.importorskip("numba")
    rng = np.random.default_rng(29)
    q, k, v = qkv(rng, (2, 4, 9, 16), (2, 4, 9, 16))
    with pytest.raises(ValueError) as info:  # the user's bug: not a BackendError
        fm.attention(q, k, v, m.predicate(boom), return_weights=weights, backend=route)
    assert not isinstance(info.value, fm.BackendError)
    assert "b=1, h=2, q_idx=5, k_idx=7" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)  # the function's own error


def test_user_functions_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(31)
    q, k, v = qkv(rng, (2, 8, 300, 64), (2, 4, 300, 64))
    strategy = m.predicate(_every_third) & m.score(_alibi) & m.causal()
    outs = []
    try:
        for n in (1, 2):
            fm.set_num_threads(n)
            outs.append(fm.attention(q, k, v, strategy, backend="cython"))
    finally:
        fm.set_num_threads(None)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_nan_and_inf_rows_in_decode(backend):
    """The same rules on decode shapes (GQA, one query, D and Dv multiples of 16: the
    engine's row-major path), with and without split keys."""
    rng = np.random.default_rng(37)
    for lk in (300, 2100):
        q = np.abs(rng.standard_normal((3, 8, 1, 64))).astype(np.float32)
        k = np.abs(rng.standard_normal((3, 2, lk, 64))).astype(np.float32)
        v = rng.standard_normal((3, 2, lk, 16)).astype(np.float32)
        k[0, 1, lk // 2, 5] = np.nan  # batch 0, kv head 1: query heads 4-7 NaN
        k[1, 0, 7, 0] = np.inf  # batch 1, kv head 0: query heads 0-3 NaN
        k[2, 0, lk - 1, 0] = np.nan  # batch 2: masked by the padding, no effect
        mask = m.padding(np.array([lk, lk, lk - 1]))
        out = fm.attention(q, k, v, mask, backend=backend)
        ref, _ = reference(q, k, v, mask.to_dense((3, 8, 1, lk)))
        assert np.isnan(out[0, 4:]).all() and not np.isnan(out[0, :4]).any()
        assert np.isnan(out[1, :4]).all() and not np.isnan(out[1, 4:]).any()
        assert not np.isnan(out[2]).any()
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
