"""Rows split along the softmax axis: a two-pass reduction over their chunks.

When the last axis has several chunks, pass one computes, per block and row,
the maximum ``m`` of the kept logits and ``s = sum(exp(z - m))`` over the kept
positions (NaN for a row whose kept logits contain NaN or ``+inf``):
:func:`row_stats`. These per-chunk statistics (two floats per row and chunk)
are combined per row into weights ``w_c = s_c * exp(m_c - M) / S`` with
``M = max_c m_c`` and ``S = sum_c s_c * exp(m_c - M)``: :func:`chunk_weights`.
Pass two runs the fastmask kernel on each block (a softmax over the block's
part of the row) and multiplies it by the block's ``w_c``. A row in which
nothing is kept in any chunk is all zeros; a NaN (or kept ``+inf``) anywhere
in a row makes the whole row NaN, as in memory.

Attention with keys chunked along ``Lk`` merges its partial outputs with the
same statistics and weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import api
from ..masks.base import MaskPlan
from .blocks import Block, BlockMask, Spec, block_inputs, kept
from .workers import task_threads, thread_scope

__all__ = ["chunk_weights", "normalise_task", "row_stats", "stats_task", "weights_task"]


def row_stats(
    z: np.ndarray, plan: MaskPlan | None, bias: Any, scale: float | None, cdt: np.dtype
) -> np.ndarray:
    """Per row of ``z * scale + bias``: ``(m, s)``, max and sum of ``exp(. - m)`` over kept entries.

    ``m = -inf, s = 0`` for a row that keeps nothing finite; both NaN for a row
    whose kept logits contain NaN or ``+inf``. Shape ``z.shape[:-1] + (2,)``, float64.
    """
    z = np.asarray(z).astype(cdt)
    if scale is not None and scale != 1.0:
        z *= cdt.type(scale)
    if bias is not None:
        z = z + np.asarray(bias).astype(cdt, copy=False)
    keep = kept(plan, z.shape)
    out = np.empty((*z.shape[:-1], 2), np.float64)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        bad = np.isnan(z) | (z == np.inf)
        if keep is not None:
            bad &= keep
            z = np.where(keep, z, -np.inf)
        nan_row = bad.any(axis=-1)
        z = np.where(bad, -np.inf, z)
        if z.shape[-1] == 0:
            m = np.full(z.shape[:-1], -np.inf)
            s = np.zeros(z.shape[:-1])
        else:
            m = z.max(axis=-1)
            shift = np.where(m == -np.inf, 0, m).astype(cdt)
            s = np.exp(z - shift[..., None]).sum(axis=-1, dtype=np.float64)
    out[..., 0] = np.where(nan_row, np.nan, m)
    out[..., 1] = np.where(nan_row, np.nan, s)
    return out


def chunk_weights(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per row, chunk statistics ``(m_c, s_c)`` (last axis: chunks) -> weights ``w_c``.

    ``w_c = s_c exp(m_c - M) / S``: the share of the row's softmax mass in chunk
    ``c``. Zero for every chunk of a row that keeps nothing; NaN for a NaN row.
    """
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        nan_row = np.isnan(m).any(axis=-1, keepdims=True)
        mm = np.where(np.isnan(m), -np.inf, m)
        big = mm.max(axis=-1, keepdims=True)
        e = np.where(s > 0, s * np.exp(mm - np.where(big == -np.inf, 0, big)), 0.0)
        total = e.sum(axis=-1, keepdims=True)
        w = np.where(total > 0, e / np.where(total > 0, total, 1), 0.0)
    return np.where(nan_row, np.nan, w)


def stats_task(xb, blk: Block, *dops, spec: Spec):
    """Pass one of split rows: per row of the block, ``(m, s)`` over its kept logits."""
    x_in, plan, bias, scale = block_inputs(spec, blk, xb, dops)
    return row_stats(x_in, plan, bias, scale, spec.compute_dtype)


def weights_task(st: np.ndarray) -> np.ndarray:
    """Interleaved ``(m_0, s_0, m_1, s_1, ...)`` per row -> the chunk weights ``w_c``."""
    return chunk_weights(st[..., 0::2], st[..., 1::2])


def normalise_task(xb, blk: Block, *dops, spec: Spec):
    """Pass two of split rows: the block's own softmax times its chunk's weight."""
    wb = dops[-1]
    with thread_scope(task_threads(spec.threads)):
        x_in, plan, bias, scale = block_inputs(spec, blk, xb, dops[:-1])
        cdt = spec.compute_dtype
        if np.asarray(x_in).dtype != cdt:  # float16: one rounding, at the end
            x_in = np.asarray(x_in).astype(cdt)
        mask = None if plan is None else BlockMask(plan)
        y = api.masked_softmax(x_in, mask, bias=bias, scale=scale, backend=spec.backend)
    y *= wb.astype(y.dtype)
    return y.astype(spec.dtype, copy=False)
