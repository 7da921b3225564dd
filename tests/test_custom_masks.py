"""User predicates and score functions (``fm.masks.predicate`` / ``fm.masks.score``).

Each case runs on every backend: ``numba`` fuses the compiled functions into its
kernel, ``numpy`` materialises them, ``cython`` declines with a reason. Results
are checked against the NumPy reference fed with the mask and scores obtained
by calling the *Python* functions element by element (independent of Numba),
and ``.to_dense()`` against the same.
"""

from __future__ import annotations

import decimal
import gc
import os
import pickle

import numpy as np
import pytest
from conftest import TOLERANCE, assert_matches_reference, logits

import fastmask as fm
from fastmask import masks
from fastmask.masks.base import canonical_dims
from fastmask.reference import masked_softmax_reference

numba = pytest.importorskip("numba")

# ----------------------------------------------------------------------------
# helpers: the Python functions evaluated element by element


def python_keep(strategy_fns, shape):
    """AND of Python predicates ``f(b, h, q, k)`` over every index of ``shape``."""
    b, h, q, n = canonical_dims(shape)
    out = np.ones((b, h, q, n), bool)
    for idx in np.ndindex(b, h, q, n):
        out[idx] = all(bool(f(*idx)) for f in strategy_fns)
    return out.reshape(shape)


def python_scores(score_fns, z, shape):
    """Python score functions ``f(s, b, h, q, k)`` applied in turn to every element of ``z``."""
    dims = canonical_dims(shape)
    z4 = np.asarray(z, np.float64).reshape(dims).copy()
    for idx in np.ndindex(*dims):
        s = z4[idx]
        for f in score_fns:
            s = f(s, *idx)
        z4[idx] = s
    return z4.reshape(shape)


def expected(x, keep=None, bias=None, scale=None, score_fns=()):
    """The float64 reference, with the score functions applied in Python."""
    z = np.asarray(x, np.float64) * (1.0 if scale is None else scale)
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    if score_fns:
        z = python_scores(score_fns, np.broadcast_to(z, x.shape), x.shape)
    return masked_softmax_reference(z, keep)


def check(y, x, keep=None, **kw):
    y = np.asarray(y)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = expected(x, keep, **kw)
    np.testing.assert_allclose(y.astype(np.float64), ref, equal_nan=True, **TOLERANCE[y.dtype])
    if keep is not None:
        dropped = ~np.broadcast_to(keep, x.shape) & ~np.isnan(ref)
        assert np.all(y[dropped] == 0), "masked positions must be exactly 0"


def run(backend, x, mask, **kw):
    """fm.masked_softmax on ``backend``; None where the backend (cython) declines."""
    if backend == "cython":
        with pytest.raises(ValueError, match="run in the numba backend"):
            fm.masked_softmax(x, mask, backend=backend, **kw)
        return None
    return fm.masked_softmax(x, mask, backend=backend, **kw)


# ----------------------------------------------------------------------------
# the functions under test (module level: Numba freezes the arrays they read)

TOKEN_KIND = np.array([0, 1, 1, 2, 0, 1, 2, 2, 0, 1, 0, 2, 1, 0, 2, 1, 0], np.int64)
LENGTHS = np.array([5, 17, 0], np.int64)  # per batch entry (batch of 3)
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float64)  # per flat head


def causal_fn(b, h, q, k):
    return k <= q


def even_keys(b, h, q, k):
    return k % 2 == 0


def same_kind(b, h, q, k):
    return TOKEN_KIND[q] == TOKEN_KIND[k]


def per_batch_length(b, h, q, k):
    return k < LENGTHS[b]


def per_head(b, h, q, k):
    return (k + h) % 3 != 0


def holes(b, h, q, k):  # kept at both ends of the row, dropped in the middle
    return k < 2 or k > q + 3 or k == 7


def alibi_fn(s, b, h, q, k):
    return s + SLOPES[h % 4] * (k - q)


def softcap_fn(s, b, h, q, k):
    return 3.0 * np.tanh(s / 3.0)


def neg_inf_far(s, b, h, q, k):
    return -np.inf if abs(q - k) > 4 else s


def double(s, b, h, q, k):
    return 2.0 * s


def plus_row(s, b, h, q, k):
    return s + 0.1 * q


P = {name: masks.predicate(f) for name, f in [
    ("causal", causal_fn), ("even", even_keys), ("kind", same_kind),
    ("length", per_batch_length), ("head", per_head), ("holes", holes),
]}  # fmt: skip
S = {name: masks.score(f) for name, f in [
    ("alibi", alibi_fn), ("softcap", softcap_fn), ("far", neg_inf_far),
    ("double", double), ("plus_row", plus_row),
]}  # fmt: skip

# name -> (strategy, Python predicates, Python score functions, built-in part or None)
CASES = {
    "predicate": lambda: (P["causal"], [causal_fn], [], None),
    "closure-array": lambda: (P["kind"], [same_kind], [], None),
    "per-batch": lambda: (P["length"], [per_batch_length], [], None),
    "per-head": lambda: (P["head"], [per_head], [], None),
    "holes": lambda: (P["holes"], [holes], [], None),
    "pred&pred": lambda: (P["even"] & P["kind"], [even_keys, same_kind], [], None),
    "causal&pred": lambda: (masks.causal() & P["even"], [even_keys], [], masks.causal()),
    "padding&pred": lambda: (
        masks.padding([3, 17, 9]) & P["kind"],
        [same_kind],
        [],
        masks.padding([3, 17, 9]),
    ),
    "window&pred": lambda: (
        P["head"] & masks.sliding_window(5),
        [per_head],
        [],
        masks.sliding_window(5),
    ),
    "segments&pred": lambda: (
        masks.segments(np.arange(11) % 3, np.arange(17) % 3) & P["even"],
        [even_keys],
        [],
        masks.segments(np.arange(11) % 3, np.arange(17) % 3),
    ),
    "dense&pred": lambda: (
        masks.keep(np.arange(17) % 3 != 1) & P["holes"],
        [holes],
        [],
        masks.keep(np.arange(17) % 3 != 1),
    ),
    "score": lambda: (S["alibi"], [], [alibi_fn], None),
    "score&causal": lambda: (S["alibi"] & masks.causal(), [], [alibi_fn], masks.causal()),
    "softcap&padding&pred": lambda: (
        masks.padding([4, 17, 11]) & S["softcap"] & P["kind"],
        [same_kind],
        [softcap_fn],
        masks.padding([4, 17, 11]),
    ),
    "score-neg-inf": lambda: (S["far"], [], [neg_inf_far], None),
    "score&score": lambda: (S["double"] & S["plus_row"], [], [double, plus_row], None),
    "score&score-reversed": lambda: (S["plus_row"] & S["double"], [], [plus_row, double], None),
}


def _dense_parts(case, shape):
    _, preds, scores, builtin = case
    keep = python_keep(preds, shape) if preds else np.ones(shape, bool)
    if builtin is not None:
        keep &= builtin.to_dense(shape)
    return keep, scores


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(3, 11, 17), (3, 2, 11, 17)], ids=["3d", "4d"])
def test_cases_match_python_evaluation(backend, name, shape, rng):
    case = CASES[name]()
    strategy = case[0]
    keep, scores = _dense_parts(case, shape)
    np.testing.assert_array_equal(strategy.to_dense(shape), keep)
    for dtype in (np.float32, np.float64):
        x = logits(rng, shape, dtype)
        y = run(backend, x, strategy)
        if y is not None:
            check(y, x, keep, score_fns=scores)


@pytest.mark.parametrize("name", ["causal&pred", "softcap&padding&pred", "score&causal"])
def test_float16_bias_scale_and_in_place(backend, name, rng):
    case = CASES[name]()
    shape = (3, 2, 11, 17)
    keep, scores = _dense_parts(case, shape)
    x = logits(rng, shape, np.float16)
    bias = rng.standard_normal((1, 2, 1, 17)).astype(np.float16)
    y = run(backend, x, case[0], bias=bias, scale=0.7)
    if y is None:
        return
    check(y, x, keep, bias=bias, scale=0.7, score_fns=scores)
    # in place, float32, through a strided view
    base = logits(rng, (3, 2, 11, 34))
    v = base[..., ::2]
    orig = v.copy()
    fm.masked_softmax(v, case[0], bias=bias.astype(np.float32), out=v, backend=backend)
    check(v, orig, keep, bias=bias.astype(np.float32), score_fns=scores)


def test_five_dims_and_split_calls_see_global_heads(backend, rng):
    # (B, 2, 3, Lq, Lk) with the two head axes transposed: the call is split along
    # axis 1, so each part starts at a non-zero head h0; h must stay the flat index.
    x = logits(rng, (2, 3, 2, 5, 7)).transpose(0, 2, 1, 3, 4)
    strategy = P["head"] & S["alibi"]
    keep = python_keep([per_head], x.shape)
    y = run(backend, x, strategy)
    if y is not None:
        check(y, x, keep, score_fns=[alibi_fn])


def test_parallel_kernel_and_long_rows(rng):
    x = logits(rng, (2, 4, 64, 300))  # enough work for several threads
    strategy = masks.causal(align="bottom-right") & P["even"] & S["softcap"]
    keep = python_keep([even_keys], x.shape) & masks.causal(align="bottom-right").to_dense(x.shape)
    y = fm.masked_softmax(x, strategy, backend="numba")
    check(y, x, keep, score_fns=[softcap_fn])
    row = logits(rng, (1, 1, 2, 70_001))
    y = fm.masked_softmax(row, P["even"] & S["double"], backend="numba")
    check(y, row, python_keep([even_keys], row.shape), score_fns=[double])


def test_rows_with_nothing_kept_are_zeros(backend, rng):
    x = logits(rng, (3, 4, 9))
    y = run(backend, x, P["length"])  # batch entry 2 has length 0
    if y is not None:
        assert np.all(y[2] == 0) and not np.isnan(y).any()
        check(y, x, python_keep([per_batch_length], x.shape))
    y = run(backend, x, S["far"] & masks.padding([9, 0, 9]))
    if y is not None:
        assert np.all(y[1] == 0)


def test_edge_values_with_a_predicate(backend):
    x = np.array([[1.0, np.nan, 3.0, 4.0], [np.inf, 1.0, 2.0, 3.0], [-np.inf] * 4], np.float32)
    odd = masks.predicate(lambda b, h, q, k: k % 2 == 1 or q == 1)
    keep = python_keep([lambda b, h, q, k: k % 2 == 1 or q == 1], x.shape)
    y = run(backend, x, odd)
    if y is not None:
        check(y, x, keep)
        assert np.all(np.isnan(y[0]))  # a kept NaN
        assert np.all(np.isnan(y[1]))  # a kept +inf
        assert np.all(y[2] == 0)  # all -inf


# ----------------------------------------------------------------------------
# closures, compilation, identity


def test_closure_arrays_are_frozen_at_first_use(rng):
    kinds = np.array([0, 0, 1, 1, 2, 2])

    @masks.predicate
    def by_kind(b, h, q, k):
        return kinds[q] == kinds[k]

    x = logits(rng, (2, 6, 6))
    before = python_keep([lambda b, h, q, k: kinds[q] == kinds[k]], x.shape)
    y1 = fm.masked_softmax(x, by_kind, backend="numba")
    kinds[:] = [0, 1, 0, 1, 0, 1]  # too late: Numba froze the array when compiling
    y2 = fm.masked_softmax(x, by_kind, backend="numba")
    np.testing.assert_array_equal(y1, y2)
    check(y2, x, before)
    np.testing.assert_array_equal(by_kind.to_dense(x.shape), before)

    # a new predicate over the same function object sees the new contents
    fresh = masks.predicate(by_kind.fn)
    after = python_keep([lambda b, h, q, k: kinds[q] == kinds[k]], x.shape)
    check(fm.masked_softmax(x, fresh, backend="numba"), x, after)


def test_each_function_compiles_once_and_combinations_are_reused(rng):
    pred = masks.predicate(lambda b, h, q, k: q >= k)
    sc = masks.score(lambda s, b, h, q, k: s * 0.5)
    x32, x64 = logits(rng, (2, 5, 5)), logits(rng, (2, 5, 5), np.float64)
    for x in (x32, x64, x32):
        fm.masked_softmax(x, pred & sc, backend="numba")
    assert len(pred._rows) == 1  # one row function for every dtype
    assert sorted(sc._rows) == ["d", "f"]  # one per compute dtype
    both = pred & masks.causal() & P["even"]
    a = both.plan(x32.shape).predicate
    assert a is (pred & P["even"]).plan(x32.shape).predicate  # one compiled AND
    for x in (x32, x64):
        fm.masked_softmax(x, both, backend="numba")
    assert len(a._rows) == 1


def test_routing_distinguishes_predicates_and_explains_cython(rng):
    x = logits(rng, (2, 6, 6))
    keep_even = python_keep([even_keys], x.shape)
    keep_causal = python_keep([causal_fn], x.shape)
    for _ in range(2):  # same shape, same routing signature but for the predicate
        check(fm.masked_softmax(x, P["even"]), x, keep_even)
        check(fm.masked_softmax(x, P["causal"]), x, keep_causal)
    text = str(fm.explain(x, P["even"] & masks.causal()))
    assert "cython" in text and "run in the numba backend" in text
    assert fm.explain(x, P["even"]).chosen in ("numba", "numpy")
    assert fm.explain(x, masks.causal()).chosen in ("numba", "cython")  # unaffected


def test_pickled_strategies_compile_again(rng):
    x = logits(rng, (3, 2, 11, 17))
    strategy = masks.padding([3, 17, 9]) & P["kind"] & S["softcap"]
    y = fm.masked_softmax(x, strategy, backend="numba")  # compiled here first
    copy = pickle.loads(pickle.dumps(strategy))
    np.testing.assert_array_equal(fm.masked_softmax(x, copy, backend="numba"), y)
    pred_copy = pickle.loads(pickle.dumps(P["kind"]))
    assert pred_copy.name == P["kind"].name and pred_copy.key != P["kind"].key
    both = (P["even"] & P["kind"]).plan(x.shape).predicate  # a compiled AND
    both_copy = pickle.loads(pickle.dumps(both))
    assert both_copy.name == "even_keys & same_kind"
    np.testing.assert_array_equal(both_copy.to_dense(x.shape), both.to_dense(x.shape))


def test_numba_dispatcher_accepted(rng):
    jitted = numba.njit(lambda b, h, q, k: k >= q)
    pred = masks.predicate(jitted, name="upper")
    x = logits(rng, (4, 4))
    assert repr(pred) == "masks.predicate(upper)"
    check(fm.masked_softmax(x, pred, backend="numba"), x, np.triu(np.ones((4, 4), bool)))


def test_structured_axis_rule_and_attention(rng):
    x = logits(rng, (4, 4))
    with pytest.raises(ValueError, match="softmax axis last"):
        fm.masked_softmax(x, P["causal"], axis=0)
    q = logits(rng, (1, 2, 4, 8))
    # attention runs user predicates in the fused engine (tests/test_attention_engine.py)
    np.testing.assert_allclose(
        fm.attention(q, q, q, mask=P["causal"]), fm.attention(q, q, q, mask=masks.causal()),
        atol=1e-6,
    )  # fmt: skip


# ----------------------------------------------------------------------------
# errors


def test_registration_errors():
    with pytest.raises(TypeError, match="must return a bool"):
        masks.predicate(lambda b, h, q, k: 1)
    with pytest.raises(TypeError, match=r"raised ZeroDivisionError when called"):
        masks.predicate(lambda b, h, q, k: 1 / q > 0)
    with pytest.raises(TypeError, match="takes a function"):
        masks.predicate(np.ones(3))
    with pytest.raises(TypeError, match="must return the new score"):
        masks.score(lambda s, b, h, q, k: "s")
    with pytest.raises(TypeError, match="must return the new score"):
        masks.score(lambda s, b, h, q, k: s > 0)
    with pytest.raises(TypeError, match="raised IndexError"):
        masks.score(lambda s, b, h, q, k: SLOPES[9])


def test_compilation_errors_name_the_function(rng):
    def uses_decimal(b, h, q, k):  # fine in Python, not in Numba's nopython mode
        return decimal.Decimal(k) <= q

    def int_in_numba(b, h, q, k):  # a bool in Python at (0,0,0,0), an int for Numba
        return True if k <= q else 0

    x = logits(rng, (3, 3))
    for fn, pattern in [(uses_decimal, "uses_decimal"), (int_in_numba, "must return a bool")]:
        pred = masks.predicate(fn)
        for backend in ("numba", "numpy", None):
            with pytest.raises(TypeError, match=pattern):
                fm.masked_softmax(x, pred, backend=backend)
    with pytest.raises(TypeError, match="could not be compiled"):
        fm.masked_softmax(x, masks.score(lambda s, b, h, q, k: s + float(decimal.Decimal(q))))


def test_runtime_errors_name_the_function_and_row(rng):
    def boom(b, h, q, k):
        if q == 2 and k == 1:
            raise ValueError("no such token")
        return True

    pred = masks.predicate(boom)
    x = logits(rng, (2, 4, 5))
    for backend in ("numba", "numpy", None):  # the user's bug: ValueError, not BackendError
        with pytest.raises(ValueError) as info:
            fm.masked_softmax(x, pred, backend=backend)
        assert not isinstance(info.value, fm.BackendError)
        assert "boom" in str(info.value) and "q_idx=2, k_idx=1" in str(info.value)
        assert "no such token" in str(info.value)
        assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ValueError, match="no such token"):
        pred.to_dense(x.shape)

    def bad_score(s, b, h, q, k):
        if k == 3:
            raise ValueError("bad score")
        return s

    with pytest.raises(ValueError, match="score function 'test_runtime.*bad_score'"):
        fm.masked_softmax(x, masks.score(bad_score), backend="numba")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_a_predicate_per_request_does_not_grow_memory():
    """Regression: each new predicate(...) compiled again (~1.2 MB never freed, +120 MB
    for 100): one per request grew a service without bound. The same function (same
    code, closure values and globals) now compiles once; other values still count."""

    def per_request(width):
        def near(b, h, q, k):
            return abs(q - k) <= width

        return masks.predicate(near)

    x = np.zeros((1, 2, 16, 16), np.float32)
    fm.masked_softmax(x, per_request(2), backend="numba")  # compile, warm up
    gc.collect()
    before = _rss_mb()
    for _ in range(100):
        y = fm.masked_softmax(x, per_request(2), backend="numba")
    gc.collect()
    assert _rss_mb() - before < 20, "compiled machine code is not shared"
    keep2 = np.abs(np.arange(16)[:, None] - np.arange(16)) <= 2
    assert_matches_reference(y, x, keep=keep2)
    other = fm.masked_softmax(x, per_request(5), backend="numba")  # another value: its own
    assert_matches_reference(other, x, keep=np.abs(np.arange(16)[:, None] - np.arange(16)) <= 5)
    assert per_request(2)._code_key == per_request(2)._code_key
    assert per_request(2)._code_key != per_request(2.0)._code_key  # 2 == 2.0, other types
    table = np.arange(3)

    def from_a_table(b, h, q, k):
        return k <= table[q % 3]

    assert masks.predicate(from_a_table)._code_key is None  # an array: compiled on its own
