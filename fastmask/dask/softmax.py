""":func:`masked_softmax` of dask arrays: one task per block, or two passes for split rows.

Blocks along the batch, head and query axes are independent: each is one task
that calls :func:`fastmask.masked_softmax` on that block with the block's mask
plan (:mod:`.blocks`). Rows chunked along the softmax axis go through the
two-pass reduction of :mod:`.split_rows`.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np

from .. import api
from ..rules import LOGITS_HINT, check_float, check_scale, check_structured_axis, softmax_axis
from .blocks import ArrayValuesDep, Block, BlockMask, Spec, block_inputs
from .operands import as_dask, describe, move_last, prepare, prepare_bias, split_mask
from .split_rows import normalise_task, stats_task, weights_task
from .workers import check_threads, task_threads, thread_scope

__all__ = ["masked_softmax"]


def _softmax_task(xb, blk: Block, *dops, spec: Spec):
    """One block of a masked softmax whose rows lie whole in the block."""
    with thread_scope(task_threads(spec.threads)):
        x_in, plan, bias, scale = block_inputs(spec, blk, xb, dops)
        mask = None if plan is None else BlockMask(plan)
        y = api.masked_softmax(x_in, mask, bias=bias, scale=scale, backend=spec.backend)
    return y.astype(spec.dtype, copy=False)


def masked_softmax(
    x: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: float | None = None,
    axis: int = -1,
    backend: str | None = None,
    threads: int | None = None,
) -> da.Array:
    """:func:`fastmask.masked_softmax` of a dask array, as a lazy dask array.

    Parameters
    ----------
    x : dask.array.Array
        Logits, float16, float32 or float64, chunked along any axes (a NumPy
        array is taken as one chunk). Chunks along the softmax axis are combined
        by a two-pass reduction (see :mod:`fastmask.dask.split_rows`).
    mask : MaskStrategy, bool array or dask bool array, optional
        As for :func:`fastmask.masked_softmax` (**True = keep**). Structured
        strategies are evaluated on the client and each block gets its rows'
        intervals; dense masks may be NumPy arrays that broadcast (each block
        gets its slice) or dask arrays (rechunked to ``x``'s chunks where they
        differ). :func:`keep` / :func:`drop` wrap a dask array as a strategy
        that composes with ``&``.
    bias : array_like or dask array, optional
        Additive float bias broadcastable to ``x``, added after scaling.
    scale : float, optional
        Multiplies the logits first.
    axis : int
        The softmax axis (structured strategies need the last axis).
    backend : str, optional
        Force a fastmask backend in every task.
    threads : int, optional
        fastmask threads per task (default: :func:`task_threads`' rule).

    Returns
    -------
    dask.array.Array
        Same shape, chunks and dtype as ``x``: the weights, with the in-memory
        call's rules (a row with nothing kept is all zeros; NaN in a kept logit
        makes its row NaN).

    Raises
    ------
    TypeError, ValueError
        As the in-memory call, at once (before anything is computed).
    """
    xd = as_dask(x, "x")
    check_float(describe(xd, "x (the logits)"), LOGITS_HINT)
    nd = xd.ndim
    ax = softmax_axis(axis, nd)
    s = check_scale(scale)
    threads = check_threads(threads)
    strategy, dense = split_mask(mask)
    check_structured_axis(strategy, ax, nd, axis)
    bias = prepare_bias(bias)
    if ax != nd - 1:
        xd = da.moveaxis(xd, ax, -1)
        dense = [move_last(a, ax, nd, "mask") for a in dense]
        bias = None if bias is None else move_last(bias, ax, nd, "bias")

    gshape = tuple(int(d) for d in xd.shape)
    prep = prepare(strategy, dense, bias, gshape, xd.chunks, "x's")
    spec = prep.spec(gshape, xd.dtype, s, backend, threads)
    ind = tuple(range(nd))
    blocks = ArrayValuesDep(xd.chunks, prep.table(xd.chunks))
    common = [xd, ind, blocks, ind]
    for op in prep.dask_ops:
        common += [op, ind]
    token = dask.base.tokenize(xd, *prep.dask_ops, blocks, spec)
    meta = np.empty((0,) * nd, xd.dtype)
    kw = {"concatenate": True, "align_arrays": False}

    if len(xd.chunks[-1]) <= 1:
        y = da.blockwise(
            _softmax_task, ind, *common, spec=spec, dtype=xd.dtype, meta=meta,
            name=f"fastmask-masked-softmax-{token}", **kw,
        )  # fmt: skip
    else:
        stats = da.blockwise(
            stats_task, ind, *common, spec=spec, dtype=np.float64,
            meta=np.empty((0,) * nd, np.float64), adjust_chunks={nd - 1: 2},
            name=f"fastmask-softmax-stats-{token}", **kw,
        )  # fmt: skip
        nc = len(xd.chunks[-1])
        stats = stats.rechunk({nd - 1: -1})  # all of a row's chunk statistics together
        w = da.map_blocks(
            weights_task, stats, dtype=np.float64, chunks=(*stats.chunks[:-1], (nc,)),
            meta=np.empty((0,) * nd, np.float64), name=f"fastmask-softmax-weights-{token}",
        )  # fmt: skip
        w = w.rechunk({nd - 1: 1})  # one weight per row and chunk, aligned with x's chunks
        y = da.blockwise(
            normalise_task, ind, *common, w, ind, spec=spec, dtype=xd.dtype, meta=meta,
            name=f"fastmask-softmax-normalise-{token}", **kw,
        )  # fmt: skip
    if ax != nd - 1:
        y = da.moveaxis(y, -1, ax)
    return y
