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
    causal: bool = False  # the mask is causal (peers with an is_causal flag use it)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    make: Callable[[np.random.Generator], Inputs]
    op: str = "masked_softmax"  # or "attention"
    repeats: int = 10
    quick_repeats: int = 3
    tags: tuple[str, ...] = field(default=())


def _padding_lengths(rng, batch, lo, hi):
    return rng.integers(lo, hi + 1, size=batch)


def _w1_padding(rng, dtype=np.float32):
    x = rng.standard_normal((8, 12, 512, 512), dtype=np.float32).astype(dtype, copy=False)
    lengths = _padding_lengths(rng, 8, 128, 512)
    keep = (np.arange(512) < lengths[:, None])[:, None, None, :]
    return Inputs(x, {"mask": fm.masks.padding(lengths)}, keep)


def _w1_dense(rng):
    base = _w1_padding(rng)
    return Inputs(base.x, {"mask": base.keep}, base.keep)


def _w2_causal(rng):
    x = rng.standard_normal((1, 16, 2048, 2048), dtype=np.float32)
    keep = np.tril(np.ones((2048, 2048), bool))[None, None]
    return Inputs(x, {"mask": fm.masks.causal()}, keep)


def _w4_small(rng):
    x = rng.standard_normal((1, 12, 64, 64), dtype=np.float32)
    lengths = np.array([40])
    keep = (np.arange(64) < lengths[:, None])[:, None, None, :]
    return Inputs(x, {"mask": fm.masks.padding(lengths)}, keep)


def _a1_padding(rng):
    q, k, v = (rng.standard_normal((8, 12, 512, 64), dtype=np.float32) for _ in range(3))
    lengths = _padding_lengths(rng, 8, 128, 512)
    keep = (np.arange(512) < lengths[:, None])[:, None, None, :]
    return Inputs(q, {"mask": fm.masks.padding(lengths)}, keep, q=q, k=k, v=v)


def _a2_causal(rng):
    q, k, v = (rng.standard_normal((1, 16, 2048, 64), dtype=np.float32) for _ in range(3))
    keep = np.tril(np.ones((2048, 2048), bool))
    return Inputs(q, {"mask": fm.masks.causal()}, keep, q=q, k=k, v=v, causal=True)


def _tiny(rng):
    x = rng.standard_normal((1, 1, 1, 8), dtype=np.float32)
    return Inputs(x, {}, None)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("W1", "encoder padding (8,12,512,512) f32, padding(lengths in [128,512])",
                 _w1_padding, tags=("core",)),
        Workload("W1-dense", "W1 with a dense (8,1,1,512) bool mask", _w1_dense),
        Workload("W2", "causal prefill (1,16,2048,2048) f32, causal()", _w2_causal, repeats=5),
        Workload("W4", "small (1,12,64,64) f32, padding", _w4_small, repeats=2000,
                 quick_repeats=300),
        Workload("tiny", "tiny (1,1,1,8) f32, no mask: per-call overhead", _tiny,
                 repeats=20000, quick_repeats=3000, tags=("core",)),
        Workload("A1", "attention (8,12,512,64) f32, padding(lengths in [128,512])",
                 _a1_padding, op="attention", tags=("attention",)),
        Workload("A2", "attention causal prefill (1,16,2048,64) f32, causal()", _a2_causal,
                 repeats=5, op="attention", tags=("attention",)),
    ]
}  # fmt: skip
