"""Repeated attention calls: reused requests (``_attention_into``) and routing families.

A model calls attention once per layer with operands of equal shapes and the same
mask object, and a generation's decode steps grow the key count by one per step.
fastmask reuses the first call's validated request and routes a new key count by
its family (:mod:`fastmask.router`). These tests check that the reuse never changes
a result (against the NumPy reference), never keeps operands alive, and never
runs a backend that declines a call.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import BackendsPlugin

import fastmask as fm
from fastmask import router
from fastmask.reference import masked_softmax_reference

attention_module = sys.modules["fastmask.attention"]
attention_into = attention_module._attention_into


def reference(q, k, v, mask, scale):
    """float64 attention through the reference masked softmax."""
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64))
    if isinstance(mask, fm.masks.MaskStrategy):
        mask = mask.to_dense(s.shape)
    w = masked_softmax_reference(s, mask, scale=scale)
    return np.einsum("bhqk,bhkd->bhqd", w, v.astype(np.float64))


def grouped(a, group):
    return np.repeat(a, group, axis=1)  # the reference reads kv heads by repeating them


def into(q, k, v, mask=None, scale=0.125):
    """Attention into a transposed (B, Lq, H, Dv) buffer, as torch_ops writes it."""
    b, h, lq, _ = q.shape
    out = np.full((b, lq, h, v.shape[3]), np.nan, q.dtype).transpose(0, 2, 1, 3)
    attention_into(out, q, k, v, mask, scale=scale)
    return out


@pytest.fixture(autouse=True)
def fresh():
    attention_module._templates.clear()
    router.invalidate()
    yield
    attention_module._templates.clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "window"])
def test_reused_requests_give_the_reference_for_new_data_and_key_counts(dtype, mask_kind):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 8, 3, 16)).astype(dtype)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    masks = {"none": None, "causal": fm.masks.causal(), "window": fm.masks.sliding_window(5)}
    mask = masks[mask_kind]
    # Equal shapes (one "layer" after another), then key counts that grow and shrink.
    for lk in (40, 40, 41, 57, 63, 64, 200, 39):
        k = rng.standard_normal((2, 2, lk, 16)).astype(dtype)
        v = rng.standard_normal((2, 2, lk, 16)).astype(dtype)
        qi = (q * rng.uniform(0.5, 2)).astype(dtype)
        got = into(qi, k, v, mask)
        want = reference(qi, grouped(k, 4), grouped(v, 4), mask, 0.125)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert attention_module._templates  # the fast path was taken at all


@pytest.mark.parametrize("mask_kind", ["none", "causal"])
def test_every_call_of_a_sequence_equals_the_reference(mask_kind):
    rng = np.random.default_rng(1)
    mask = None if mask_kind == "none" else fm.masks.causal(align="bottom-right")
    q = rng.standard_normal((1, 4, 2, 8)).astype(np.float32)
    for lk in (10, 10, 11, 12, 30, 17):
        k = rng.standard_normal((1, 2, lk, 8)).astype(np.float32)
        v = rng.standard_normal((1, 2, lk, 8)).astype(np.float32)
        qi = q * np.float32(rng.uniform(0.5, 2.0))
        got = into(qi, k, v, mask)
        want = reference(qi, grouped(k, 2), grouped(v, 2), mask, 0.125)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_a_new_mask_object_or_scale_is_a_new_request():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    for mask, scale in [(fm.masks.causal(), 0.5), (fm.masks.causal(offset=-2), 0.5),
                        (fm.masks.sliding_window(2), 0.5), (fm.masks.sliding_window(2), 1.5),
                        (None, 0.25)]:  # fmt: skip
        np.testing.assert_allclose(
            into(q, k, v, mask, scale), reference(q, k, v, mask, scale), rtol=2e-5, atol=2e-6
        )


def test_dense_masks_and_16_bit_floats_are_never_reused():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    keep = np.ones((1, 1, 4, 4), bool)
    mask = fm.masks.keep(keep)
    into(q, q, q, mask)
    keep[..., 1:] = False  # the user changes the array behind the strategy
    np.testing.assert_allclose(into(q, q, q, mask), reference(q, q, q, keep, 0.125), rtol=2e-5)
    h = q.astype(np.float16)
    into(h, h, h)
    assert not attention_module._templates


def test_reused_requests_keep_no_operand_alive():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 300, 8)).astype(np.float32)
    before = sys.getrefcount(k), sys.getrefcount(q)
    for _ in range(3):
        into(q, k, k)
    assert (sys.getrefcount(k), sys.getrefcount(q)) == before
    ((_, template, _, _),) = attention_module._templates.values()
    assert template.q4 is None and template.k4 is None and template.out4 is None


class Declining(fm.Backend):
    """The numpy backend's attention, cheapest of all, for at most ``limit`` keys."""

    name = "declining"
    description = "test backend"
    ops = frozenset({"attention"})

    def __init__(self, limit):
        self.limit, self.checks, self.runs = limit, 0, 0

    def check(self, request):
        self.checks += 1
        if request.k4.shape[2] > self.limit:
            return fm.Verdict.no(f"more than {self.limit} keys")
        return fm.Verdict(True, "toy", 1e-9)

    def attention(self, request):
        self.runs += 1
        fm.plugins.backends()["numpy"].attention(request)


def test_a_family_decision_is_checked_by_its_backend_before_it_is_used():
    backend = Declining(limit=110)
    plugin = BackendsPlugin(backend)
    fm.plugins.register(plugin, name="declining")
    try:
        rng = np.random.default_rng(5)
        q = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
        runs = []
        for lk in (100, 105, 120, 100):  # one family (64-127 keys); 120 is declined
            k = rng.standard_normal((1, 2, lk, 8)).astype(np.float32)
            want = reference(q, k, k, None, 0.125)
            before = backend.runs
            np.testing.assert_allclose(into(q, k, k), want, rtol=2e-5, atol=2e-6)
            np.testing.assert_allclose(fm.attention(q, k, k, scale=0.125), want, rtol=2e-5,
                                       atol=2e-6)  # fmt: skip
            runs.append(backend.runs - before)
        assert runs == [2, 2, 0, 2]  # both paths, each call; never the declined one
        assert fm.explain_attention(q, k, k).chosen == "declining"
    finally:
        fm.plugins.unregister(plugin)
    assert not router._families  # a plugin change forgets every decision


def test_a_new_key_count_asks_only_the_familys_backend(monkeypatch):
    """A decode step's new shape: one answer (the chosen backend's), not every backend's."""
    asked = {}

    def counting(f, key):
        def counted(request):
            asked[key] = asked.get(key, 0) + 1
            return f(request)

        return counted

    for name, b in fm.plugins.backends().items():
        for method in ("check", "accepts"):
            monkeypatch.setattr(b, method, counting(getattr(b, method), (name, method)))
    q = np.ones((1, 2, 1, 8), np.float32)
    for lk in range(64, 128):
        k = np.ones((1, 2, lk, 8), np.float32)
        fm.attention(q, k, k)
    chosen = router.cached(fm.attention_request.build_attention_requests(q, k, k)[0][0]).name
    assert asked[(chosen, "accepts")] == 63, asked  # every new key count after the first
    assert all(n == 1 for (name, m), n in asked.items() if m == "check"), asked


def test_the_cython_backend_accepts_what_it_checks():
    from fastmask.attention_request import build_attention_requests

    cython = fm.plugins.backends()["cython"]
    q = np.ones((2, 4, 3, 8), np.float32)
    for mask in (None, fm.masks.causal(), fm.masks.keep(np.eye(3, 5, dtype=bool)),
                 fm.masks.predicate(lambda b, h, i, j: j <= i)):  # fmt: skip
        kv = np.ones((2, 4, 5, 8), np.float32)
        request = build_attention_requests(q, kv, kv, mask)[0][0]
        assert cython.accepts(request).ok == cython.check(request).ok


def test_bad_operands_after_a_reused_call_are_still_errors():
    q = np.ones((1, 2, 1, 8), np.float32)
    k = np.ones((1, 2, 50, 8), np.float32)
    into(q, k, k)
    with pytest.raises(ValueError, match="same number of keys"):
        into(q, k, np.ones((1, 2, 51, 8), np.float32))
    empty = np.ones((1, 2, 0, 8), np.float32)
    assert np.all(into(q, empty, empty) == 0)  # no key: zero rows, as attention() gives


@pytest.mark.parametrize("shapes", [((1, 32, 1, 64), (1, 8, 2049, 64)),
                                    ((3, 12, 37, 16), (3, 12, 100, 16)),
                                    ((2, 8, 5, 8), (2, 2, 70, 8))])  # fmt: skip
def test_the_engine_plan_without_a_mask_equals_the_general_sums(shapes):
    from fastmask import _kernels
    from fastmask.attention_request import build_attention_requests
    from fastmask.kernels import fused_attention

    q, k = np.ones(shapes[0], np.float32), np.ones(shapes[1], np.float32)
    plain = build_attention_requests(q, k, k)[0][0]
    # A mask that keeps everything takes the general path (per-item sums of the bounds).
    kept = build_attention_requests(q, k, k, fm.masks.causal(offset=10**6))[0][0]
    assert plain.bounds4 is None and kept.bounds4 is not None
    assert fused_attention.plan(plain, _kernels) == fused_attention.plan(kept, _kernels)


def test_left_padded_decode_steps_share_one_strategy_and_equal_the_reference():
    torch_ops = pytest.importorskip("fastmask.integrations.torch_ops")
    rng = np.random.default_rng(6)
    first = np.array([0, 7, 30])  # where each left-padded sequence starts
    q = rng.standard_normal((3, 4, 1, 8)).astype(np.float32)
    strategies = []
    for lk in (40, 41, 42, 64, 65):  # one step after another, and a new family
        pad = np.arange(lk)[None, :] >= first[:, None]
        mask = torch_ops.structured_mask(1, lk, key_padding=pad, q_start=lk - 1, max_ahead=0)
        strategies.append(mask)
        k = rng.standard_normal((3, 2, lk, 8)).astype(np.float32)
        v = rng.standard_normal((3, 2, lk, 8)).astype(np.float32)
        for _ in range(2):  # two layers
            got = into(q, k, v, mask)
            want = reference(q, grouped(k, 2), grouped(v, 2), pad[:, None, None, :], 0.125)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert all(s is strategies[0] for s in strategies)  # one object: its request is reused
    assert len(attention_module._templates) == 1
