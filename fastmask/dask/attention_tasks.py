"""The tasks of :func:`fastmask.dask.attention`.

With one chunk of keys, each block of queries (batch x heads x queries) is one
:func:`attention_task`: a :func:`fastmask.attention` call against all keys
(grouped-query heads are sliced per block). With keys chunked along ``Lk``,
each (block of queries, chunk of keys) pair is an :func:`attention_part_task`
that computes the block's scores, runs the kernel on them and returns its
normalised partial output with the rows' ``(m, s)``; :func:`attention_merge_task`
merges the partials with the weights ``w_c`` of :mod:`.split_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import api
from ..attention import attention as in_memory_attention
from .blocks import Block, BlockMask, Spec, aligned, block_inputs
from .split_rows import chunk_weights, row_stats
from .workers import task_threads, thread_scope

__all__ = [
    "AttentionSpec",
    "attention_merge_task",
    "attention_part_task",
    "attention_task",
    "attention_weights_task",
    "scale_weights_task",
]


@dataclass(frozen=True)
class AttentionSpec:
    mask: Spec  # on the scores: gshape = batch + (Lq, Lk)
    return_weights: bool
    group: int  # query heads per kv head (1: none, or broadcast)
    head_axis: int | None  # the batch axis of heads (grouped-query attention only)
    dv: int

    def __dask_tokenize__(self) -> Any:
        return (
            "fastmask.dask.AttentionSpec", self.mask.__dask_tokenize__(), self.return_weights,
            self.group, self.head_axis, self.dv,
        )  # fmt: skip


def _kv_heads(kb, vb, blk: Block, spec: AttentionSpec, expand: bool = False):
    """The kv heads that a block of query heads reads (grouped-query attention).

    Whole groups are sliced (the in-memory call groups them); otherwise, or with
    ``expand``, each query head gets its kv head (a copy of the block's kv).
    """
    if spec.group == 1:
        return kb, vb
    ax, g = spec.head_axis, spec.group
    h0, h1 = blk.loc[ax]
    if not expand and h0 % g == 0 and (h1 - h0) % g == 0:
        sl = (slice(None),) * ax + (slice(h0 // g, h1 // g),)
        return kb[sl], vb[sl]
    heads = np.arange(h0, h1) // g
    return np.take(kb, heads, axis=ax), np.take(vb, heads, axis=ax)


def attention_task(qb, kb, vb, blk: Block, *dops, spec: AttentionSpec):
    """One block of queries (batch x heads x queries) against all keys."""
    ms = spec.mask
    qb, kb, vb = aligned(qb), aligned(kb), aligned(vb)
    kb, vb = _kv_heads(kb, vb, blk, spec)
    with thread_scope(task_threads(ms.threads)):
        _, plan, bias, _ = block_inputs(ms, blk, None, dops)
        mask = None if plan is None else BlockMask(plan)
        return in_memory_attention(
            qb, kb, vb, mask, bias=bias, scale=ms.scale,
            return_weights=spec.return_weights, backend=ms.backend,
        )  # fmt: skip


def attention_part_task(qb, kb, vb, blk: Block, *dops, spec: AttentionSpec):
    """A block of queries against one chunk of keys (keys split along ``Lk``).

    Returns, per row, the chunk's normalised output and its statistics
    ``(m, s)`` packed as ``rows + (1, Dv + 2)`` float64 (and with
    ``return_weights`` the chunk's own softmax, as a pair).
    """
    ms = spec.mask
    cdt = ms.compute_dtype
    kb, vb = _kv_heads(kb, vb, blk, spec, expand=True)
    q = np.asarray(qb).astype(cdt, copy=False)
    k = np.asarray(kb).astype(cdt, copy=False)
    v = np.asarray(vb).astype(cdt, copy=False)
    shape = blk.shape  # batch + (Lq_block, Lk_chunk)
    z = np.matmul(q, np.swapaxes(k, -1, -2))  # unscaled scores of the block
    z = np.ascontiguousarray(np.broadcast_to(z, shape))
    with thread_scope(task_threads(ms.threads)):
        _, plan, bias, _ = block_inputs(ms, blk, None, dops)
        mask = None if plan is None else BlockMask(plan)
        p = api.masked_softmax(z, mask, bias=bias, scale=ms.scale, backend=ms.backend)
    stats = row_stats(z, plan, bias, ms.scale, cdt)
    o = np.matmul(p, v)
    o = np.broadcast_to(o, (*shape[:-1], spec.dv))
    packed = np.concatenate([o.astype(np.float64), stats], axis=-1)[..., None, :]
    if spec.return_weights:
        return packed, p[..., None]  # the trailing axis stands in for the packed one
    return packed


def attention_merge_task(pb, *, dv: int, out_dtype: np.dtype):
    """All key chunks' partial outputs of a block of rows -> the output rows."""
    w = chunk_weights(pb[..., dv], pb[..., dv + 1])  # rows + (chunks,)
    with np.errstate(invalid="ignore"):
        parts = pb[..., :dv] * w[..., None]
    parts[w == 0] = 0.0  # a chunk that keeps nothing of a row adds nothing, whatever its v
    out = parts.sum(axis=-2)  # NaN rows stay NaN: their weights are NaN
    return out.astype(out_dtype)


def attention_weights_task(stats):
    """Packed statistics ``rows + (chunks, 2)`` -> chunk weights ``rows + (chunks,)``."""
    return chunk_weights(stats[..., 0], stats[..., 1])


def scale_weights_task(pb, wb, *, out_dtype: np.dtype):
    """A chunk's own softmax weights times the chunk's share ``w_c`` of each row."""
    return (pb * wb.astype(pb.dtype)).astype(out_dtype, copy=False)
