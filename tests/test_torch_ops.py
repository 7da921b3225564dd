"""``torch.ops.fastmask.attention`` (fastmask.integrations.torch_ops): masks passed as
structure, torch tensors in and out without copies, torch.compile, inference only.

Skips without torch (the ``bench`` or ``transformers`` extra).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("fastmask.integrations.torch_ops")

import fastmask as fm  # noqa: E402
from fastmask.masks import AllOf, Causal, DenseMask, Padding, SlidingWindow  # noqa: E402

F = torch.nn.functional


def _brute(b, lq, lk, key_padding, q_start, k_start, ahead, behind):
    """The structured mask's definition, materialised: (B, 1, Lq, Lk) booleans."""
    i = np.arange(lq)[:, None] + q_start
    j = np.arange(lk)[None, :] + k_start
    keep = np.ones((b, 1, lq, lk), bool)
    if ahead is not None:
        keep &= j - i <= ahead
    if behind is not None:
        keep &= i - j <= behind
    if key_padding is not None:
        full = np.zeros((b, k_start + lk), bool)
        n = min(key_padding.shape[1], k_start + lk)
        full[:, :n] = key_padding[:, :n]
        keep &= full[:, None, None, k_start:]
    return keep


def test_structured_masks_equal_their_definition():
    rng = np.random.default_rng(0)
    for _ in range(400):
        b, lq, lk = 2, int(rng.integers(1, 7)), int(rng.integers(1, 12))
        q_start, k_start = int(rng.integers(0, 10)), int(rng.integers(0, 6))
        ahead = (None, 0, int(rng.integers(-3, 4)))[rng.integers(3)]
        behind = (None, int(rng.integers(0, 6)))[rng.integers(2)]
        n = int(rng.integers(k_start, k_start + lk + 3))
        pad = None
        if rng.random() < 0.7:  # intervals (left, right, both) or holes
            pad = np.zeros((b, n), bool)
            for row in range(b):
                lo, hi = sorted(rng.integers(0, n + 1, 2))
                pad[row, lo:hi] = True
            if rng.random() < 0.3:
                pad = rng.random((b, n)) < 0.7
        s = torch_ops.structured_mask(lq, lk, key_padding=pad, q_start=q_start, k_start=k_start,
                                      max_ahead=ahead, max_behind=behind)  # fmt: skip
        got = np.ones((b, 1, lq, lk), bool) if s is None else s.to_dense((b, 1, lq, lk))
        want = _brute(b, lq, lk, pad, q_start, k_start, ahead, behind)
        assert np.array_equal(got, want), (lq, lk, q_start, k_start, ahead, behind, s)


def _parts(s):
    return s.parts if isinstance(s, AllOf) else (s,)


@pytest.mark.parametrize(
    "kwargs, kinds",
    [
        ({"max_ahead": 0}, {Causal}),  # causal prefill
        ({"max_ahead": 0, "q_start": 2047, "lq": 1, "lk": 2048}, set()),  # decode: every key
        ({"max_ahead": 0, "q_start": 2040, "lq": 8, "lk": 2048}, {Causal}),  # 8 new tokens
        ({"max_ahead": 0, "max_behind": 255}, {SlidingWindow}),  # sliding-window prefill
        ({"max_ahead": 0, "max_behind": 255, "q_start": 4000, "k_start": 3745, "lq": 1,
          "lk": 256}, set()),  # a sliding-window cache that dropped keys: every key kept
        ({"max_ahead": 0, "max_behind": 255, "q_start": 4000, "k_start": 3744, "lq": 1,
          "lk": 257}, {SlidingWindow}),  # one key more than the window
        ({"max_ahead": 0, "max_behind": 255, "q_start": 10, "lq": 1, "lk": 4096},
         {Causal, SlidingWindow}),  # a static cache: keys past the queries
        ({"max_ahead": 0, "pad": "left"}, {Causal, torch_ops.KeysFrom}),
        ({"pad": "right"}, {Padding}),
    ],
)  # fmt: skip
def test_model_masks_become_interval_strategies_never_lq_by_lk(kwargs, kinds):
    kwargs = dict(kwargs)
    lq, lk = kwargs.pop("lq", 8192), kwargs.pop("lk", 8192)
    side = kwargs.pop("pad", None)
    pad = None
    if side is not None:
        pad = np.ones((2, lk), bool)
        pad[1, :100] = False
        if side == "right":
            pad = pad[:, ::-1].copy()
    s = torch_ops.structured_mask(lq, lk, key_padding=pad, **kwargs)
    if not kinds:  # nothing masked: no strategy at all
        assert s is None
        return
    assert {type(p) for p in _parts(s)} == kinds
    plan = s.plan((2, 4, lq, lk))
    assert plan.keep is None  # nothing dense: intervals per row only


def test_a_padding_row_with_holes_stays_a_small_dense_mask():
    pad = np.ones((2, 64), bool)
    pad[0, 10] = False
    s = torch_ops.structured_mask(4096, 64, key_padding=pad, max_ahead=0, q_start=4032)
    (dense,) = [p for p in _parts(s) if isinstance(p, DenseMask)]
    assert dense.plan((2, 4, 4096, 64)).keep.shape == (2, 1, 1, 64)


def _sdpa_keep(b, lq, lk, **structure):
    pad = structure.pop("key_padding", None)
    keep = _brute(b, lq, lk, None if pad is None else pad.numpy(), structure.get("q_start", 0),
                  structure.get("k_start", 0), structure.get("max_ahead"),
                  structure.get("max_behind"))  # fmt: skip
    return torch.from_numpy(keep)


@pytest.mark.parametrize(
    "structure",
    [{}, {"max_ahead": 0}, {"max_ahead": 0, "max_behind": 5}, {"max_ahead": 0, "q_start": 30},
     {"max_ahead": 3, "max_behind": 3}],
)  # fmt: skip
@pytest.mark.parametrize("left", [False, True])
def test_attention_equals_sdpa_with_gqa(structure, left):
    torch.manual_seed(0)
    b, h, hk, lq, lk, d = 2, 8, 2, 6 if "q_start" in structure else 40, 40, 16
    q = torch.randn(b, lq, h, d).transpose(1, 2)  # a model's layout: a transposed view
    k, v = torch.randn(b, hk, lk, d), torch.randn(b, hk, lk, d)
    pad = torch.ones(b, lk, dtype=torch.bool)
    if left:
        pad[1, :7] = False
    else:
        pad[1, 33:] = False
    keep = _sdpa_keep(b, lq, lk, key_padding=pad, **structure)
    with torch.no_grad():
        out = torch_ops.attention(q, k, v, key_padding=pad, **structure)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    assert out.shape == (b, lq, h, d) and out.is_contiguous() and out.dtype == torch.float32
    rows = keep.any(-1)[:, 0]  # (B, Lq): queries that keep some key
    torch.testing.assert_close(out[rows], ref.transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)
    assert torch.all(out[~rows] == 0)  # a query that keeps nothing: zeros (sdpa: NaN)


def test_dense_keep_bias_and_scale():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 5)
    keep = torch.rand(2, 1, 10, 12) < 0.7
    keep[..., 0] = True
    bias = torch.randn(1, 4, 10, 12)
    with torch.no_grad():
        out = torch_ops.attention(q, k, v, keep=keep, bias=bias, scale=0.3)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~keep, -torch.inf),
                                             scale=0.3)  # fmt: skip
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_output_is_written_in_place_and_inputs_are_not_copied(monkeypatch):
    import fastmask.integrations.torch_ops as ops

    seen = {}
    real = ops._attention_into

    def spy(out, q, k, v, mask, **kw):
        seen.update(out=out, q=q, k=k, v=v)
        return real(out, q, k, v, mask, **kw)

    monkeypatch.setattr(ops, "_attention_into", spy)
    q = torch.randn(1, 16, 4, 8).transpose(1, 2)
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    with torch.inference_mode():
        out = torch_ops.attention(q, k, v, max_ahead=0)
    # The engine wrote the returned (B, Lq, H, D) tensor through a (B, H, Lq, D) view...
    assert seen["out"].ctypes.data == out.data_ptr() and seen["out"].shape == (1, 4, 16, 8)
    # ...and read q, k and v where torch keeps them (q: the model's transposed view).
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert seen[name].ctypes.data == t.data_ptr()
        assert seen[name].strides == tuple(s * 4 for s in t.stride())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_dtypes_in_and_out(dtype):
    tdt = getattr(torch, dtype)
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        out = torch_ops.attention(q.to(tdt), k.to(tdt), v.to(tdt), max_ahead=0)
    assert out.dtype == tdt
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float64": 1e-12}[dtype]  # output rounding
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=tol, rtol=tol)


def test_weights_for_output_attentions():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    with torch.no_grad():
        out, w = torch_ops.attention_with_weights(q, k, v, max_ahead=0)
        ref = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(
            torch.ones(6, 6, dtype=torch.bool).triu(1), -torch.inf), -1)  # fmt: skip
    torch.testing.assert_close(w, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, (ref @ v).transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_requires_grad_under_grad_mode_is_an_inference_only_error():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"inference only.*torch\.no_grad\(\).*inference_mode"):
        torch_ops.attention(q, q, q)
    with torch.no_grad():  # the same call without grad mode runs
        assert torch_ops.attention(q, q, q).shape == (1, 4, 2, 8)


def test_wrong_ranks_are_errors():
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        torch_ops.attention(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))


def test_the_op_is_registered_with_a_fake_implementation():
    args = (torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), None,
            None, torch.ones(2, 8, dtype=torch.bool), 0, 0, None, 0, 3, None)  # fmt: skip
    result = torch.library.opcheck(torch.ops.fastmask.attention.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.ops.fastmask.attention(torch.empty(2, 4, 8, 16), torch.empty(2, 2, 8, 16),
                                            torch.empty(2, 2, 8, 5), None, None, None, 0, 0,
                                            None, 0, None, None)  # fmt: skip
    assert fake.shape == (2, 8, 4, 5)


def test_torch_compile_fullgraph_through_the_op():
    def layer(x, pad, past: int):
        q = (x * 2).transpose(1, 2)  # (B, H, L, D) views, as a model makes them
        kv = x[:, :, :2].transpose(1, 2)
        out = torch_ops.attention(q, kv, kv, key_padding=pad, q_start=past, max_ahead=0)
        return out.sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 12, 4, 8)
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0, :3] = False
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, pad, 0), layer(x, pad, 0), atol=1e-5, rtol=1e-5)
    # fastmask ran inside the compiled graph: the op is in it, not a graph break around it
    explained = torch._dynamo.explain(layer)(x, pad, 0)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_importing_fastmask_does_not_define_the_op():
    import subprocess
    import sys

    code = ("import torch, fastmask; assert not hasattr(torch.ops.fastmask, 'attention'); "
            "import fastmask.integrations; assert 'fastmask.integrations.torch_ops' not in "
            "__import__('sys').modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
    assert fm.attention  # the core API is there all the same
