"""The benchmark workloads: one table that the suite (and the docs) use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fastmask as fm


@dataclass(frozen=True)
class Inputs:
    """A workload's arrays, in both fastmask's terms and the peers' terms.

    Attention workloads set ``q``, ``k``, ``v`` (``x`` is then ``q``, ``kwargs`` are
    for ``fm.attention`` and ``keep`` is on the scores ``(..., Lq, Lk)``).
    """

    x: np.ndarray
    kwargs: dict[str, Any]  # for fm.masked_softmax (or fm.attention)
    keep: np.ndarray | None  # boolean keep-mask broadcastable to x (or the scores), for peers
    bias: np.ndarray | None = None  # additive float mask, for peers that take one
    q: np.ndarray | None = None
    k: np.ndarray | None = None
    v: np.ndarray | None = None
    causal: bool = False  # the mask is causal() and nothing else (peers' is_causal flags)
    # The mask's structure, for peers that take it as such rather than as ``keep``:
    lengths: np.ndarray | None = None  # key padding: valid keys per sequence
    side: str = "right"  # "left": the valid keys are the last ``lengths`` (decoder batches)
    window: int | None = None  # causal sliding window: query i keeps keys i - window < j <= i

    def scores_shape(self) -> tuple[int, ...]:
        """``(..., Hq, Lq, Lk)``: q's leading axes (k/v broadcast or grouped under them)."""
        return (*self.q.shape[:-1], self.k.shape[-2])

    def attention_flops(self) -> float:
        """FLOPs of the kept scores only: ``2 * (D + Dv)`` per kept (query, key) pair."""
        shape = self.scores_shape()
        if self.keep is None:
            kept = float(np.prod(shape))
        else:
            # Broadcasting repeats every element of ``keep`` equally often, so the kept
            # count is keep's own count times that factor (no (B, H, Lq, Lk) expansion).
            assert np.broadcast_shapes(self.keep.shape, shape) == shape
            kept = float(np.count_nonzero(self.keep)) * (np.prod(shape) / self.keep.size)
        return 2.0 * (self.q.shape[-1] + self.v.shape[-1]) * kept


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    make: Callable[[np.random.Generator], Inputs]
    # or "attention", or a report: "scaling", "startup", "memory", "pipeline", "hf"
    op: str = "masked_softmax"
    repeats: int = 10
    quick_repeats: int = 3
    tags: tuple[str, ...] = field(default=())


def _padding_lengths(rng, batch, lo, hi):
    return rng.integers(lo, hi + 1, size=batch)


# W1 and W2 take their shapes as keywords too (defaults: the suite's sizes), for the tests'
# small versions of the in-pipeline benchmark.


def _w1_padding(rng, dtype=np.float32, b=8, h=12, length=512, shortest=128):
    x = rng.standard_normal((b, h, length, length), dtype=np.float32).astype(dtype, copy=False)
    lengths = _padding_lengths(rng, b, shortest, length)
    keep = (np.arange(length) < lengths[:, None])[:, None, None, :]
    return Inputs(x, {"mask": fm.masks.padding(lengths)}, keep)


def _w1_dense(rng):
    base = _w1_padding(rng)
    return Inputs(base.x, {"mask": base.keep}, base.keep)


def _w2_causal(rng, h=16, length=2048):
    x = rng.standard_normal((1, h, length, length), dtype=np.float32)
    keep = np.tril(np.ones((length, length), bool))[None, None]
    return Inputs(x, {"mask": fm.masks.causal()}, keep)


def _w3_decode(rng):
    # One query per sequence against a left-padded KV cache of up to 4096 keys.
    x = rng.standard_normal((16, 32, 1, 4096), dtype=np.float32)
    lengths = _padding_lengths(rng, 16, 1, 4096)
    keep = (np.arange(4096) >= 4096 - lengths[:, None])[:, None, None, :]
    return Inputs(x, {"mask": fm.masks.padding(lengths, side="left")}, keep)


def _w5(dtype):
    return lambda rng: _w1_padding(rng, dtype)


def _w6_bias(rng):
    # The TF tutorial's additive mask: 1.0 marks padding, scaled by -1e9.
    base = _w1_padding(rng)
    bias = (~base.keep).astype(np.float32) * np.float32(-1e9)
    return Inputs(base.x, {"bias": bias}, base.keep, bias=bias)


def _w4_small(rng):
    x = rng.standard_normal((1, 12, 64, 64), dtype=np.float32)
    lengths = np.array([40])
    keep = (np.arange(64) < lengths[:, None])[:, None, None, :]
    return Inputs(x, {"mask": fm.masks.padding(lengths)}, keep)


# The attention workloads take their shapes as keywords (defaults: the suite's sizes) so
# that the tests can build small versions of exactly the same workloads.


def attention_padding(rng, b=8, h=12, length=512, d=64, shortest=128):
    q, k, v = (rng.standard_normal((b, h, length, d), dtype=np.float32) for _ in range(3))
    lengths = _padding_lengths(rng, b, shortest, length)
    keep = (np.arange(length) < lengths[:, None])[:, None, None, :]
    return Inputs(q, {"mask": fm.masks.padding(lengths)}, keep, q=q, k=k, v=v, lengths=lengths)


def attention_causal(rng, h=16, length=2048, d=64):
    q, k, v = (rng.standard_normal((1, h, length, d), dtype=np.float32) for _ in range(3))
    keep = np.tril(np.ones((length, length), bool))
    return Inputs(q, {"mask": fm.masks.causal()}, keep, q=q, k=k, v=v, causal=True)


def attention_decode(rng, b=16, hq=32, hk=8, length=4096, d=64):
    # One query per sequence against a left-padded KV cache, grouped-query attention.
    q = rng.standard_normal((b, hq, 1, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, hk, length, d), dtype=np.float32) for _ in range(2))
    lengths = _padding_lengths(rng, b, 1, length)
    keep = (np.arange(length) >= length - lengths[:, None])[:, None, None, :]
    mask = fm.masks.padding(lengths, side="left")
    return Inputs(q, {"mask": mask}, keep, q=q, k=k, v=v, lengths=lengths, side="left")


def attention_window(rng, h=16, length=4096, d=64, window=256):
    q, k, v = (rng.standard_normal((1, h, length, d), dtype=np.float32) for _ in range(3))
    # fm.masks.sliding_window(size): query i keeps keys i - size < j <= i (windows.py).
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    keep = (j <= i) & (j > i - window)
    mask = fm.masks.sliding_window(window)
    return Inputs(q, {"mask": mask}, keep, q=q, k=k, v=v, window=window)


def _tiny(rng):
    x = rng.standard_normal((1, 1, 1, 8), dtype=np.float32)
    return Inputs(x, {}, None)


def _no_inputs(rng):
    return None  # the report builds its own inputs (often in a child process)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("W1", "encoder padding (8,12,512,512) f32, padding(lengths in [128,512])",
                 _w1_padding, tags=("core",)),
        Workload("W1-dense", "W1 with a dense (8,1,1,512) bool mask", _w1_dense),
        Workload("W2", "causal prefill (1,16,2048,2048) f32, causal()", _w2_causal, repeats=5),
        Workload("W3", "decode (16,32,1,4096) f32, left padding(lengths in [1,4096])",
                 _w3_decode, repeats=200, quick_repeats=40),
        Workload("W4", "small (1,12,64,64) f32, padding", _w4_small, repeats=2000,
                 quick_repeats=300),
        Workload("W5-f16", "W1 in float16 (computed in float32)", _w5(np.float16)),
        Workload("W5-f64", "W1 in float64", _w5(np.float64)),
        Workload("W6", "W1 with TF's additive mask: bias = mask * -1e9 (8,1,1,512) f32",
                 _w6_bias),
        Workload("tiny", "tiny (1,1,1,8) f32, no mask: per-call overhead", _tiny,
                 repeats=20000, quick_repeats=3000, tags=("core",)),
        Workload("A1", "attention (8,12,512,64) f32, padding(lengths in [128,512])",
                 attention_padding, op="attention", tags=("attention",)),
        Workload("A2", "attention causal prefill (1,16,2048,64) f32, causal()",
                 attention_causal, repeats=5, op="attention", tags=("attention",)),
        Workload("A3", "attention decode q (16,32,1,64), k/v (16,8,4096,64) f32 (GQA), "
                 "left padding(lengths in [1,4096])", attention_decode, repeats=100,
                 quick_repeats=20, op="attention", tags=("attention",)),
        Workload("A4", "attention (1,16,4096,64) f32, causal sliding_window(256)",
                 attention_window, repeats=5, op="attention", tags=("attention",)),
        Workload("scaling", "thread scaling: W1 with 1 thread and with N", _no_inputs,
                 op="scaling"),
        Workload("startup", "cold start: import, and the first call in a new process",
                 _no_inputs, op="startup"),
        Workload("memory", "peak resident memory of W2 (268 MB input) in a new process",
                 _no_inputs, op="memory"),
        Workload("pipeline", "in one process: fastmask right after NumPy/torch matmuls and "
                 "back, vs alone; an encoder layer, NumPy + fastmask vs torch", _no_inputs,
                 op="pipeline", repeats=25, quick_repeats=5),
        Workload("hf", "Hugging Face transformers: fastmask vs sdpa inside a Llama-style "
                 "decoder (prefill, decode) and BERT (all-MiniLM-L6-v2)", _no_inputs, op="hf",
                 repeats=9, quick_repeats=3),  # 9: a decode step's model time drifts ~10%
    ]
}  # fmt: skip
