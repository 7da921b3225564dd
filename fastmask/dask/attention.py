""":func:`attention` of dask arrays.

The output's blocks follow ``q``'s chunks along the batch, head and query axes;
``k``/``v`` follow them along the batch axes they span. The tasks are in
:mod:`.attention_tasks`.
"""

from __future__ import annotations

import operator
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..rules import attention_dims
from .attention_tasks import (
    AttentionSpec,
    attention_merge_task,
    attention_part_task,
    attention_task,
    attention_weights_task,
    scale_weights_task,
)
from .blocks import ArrayValuesDep
from .operands import as_dask, describe, pad, prepare, prepare_bias, split_mask
from .workers import check_threads

__all__ = ["attention"]


def attention(
    q: Any,
    k: Any,
    v: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: float | None = None,
    return_weights: bool = False,
    backend: str | None = None,
    threads: int | None = None,
) -> Any:
    """:func:`fastmask.attention` of dask arrays, as lazy dask arrays.

    Parameters
    ----------
    q : dask.array.Array, shape (..., Lq, D)
        Queries. Their chunks along the leading axes and ``Lq`` become the
        output's blocks.
    k, v : dask.array.Array, shapes (..., Lk, D) and (..., Lk, Dv)
        Keys and values (same dtype as ``q``); leading axes broadcast, and
        grouped-query attention works as in memory. They are rechunked to one
        chunk along ``D``/``Dv`` (and along the head axis for grouped-query
        attention); their other leading axes follow the output's chunks. With
        one chunk along ``Lk`` each block of queries is one task running
        :func:`fastmask.attention` against all keys; with several (keys too
        long for one task) each block of queries meets each chunk of keys in a
        task of its own, and the chunks are combined like split softmax rows
        (those tasks compute the block's scores in memory).
    mask, bias, scale, return_weights, backend
        As for :func:`fastmask.attention`, on the scores ``batch + (Lq, Lk)``;
        dense masks and biases may be dask arrays (see :func:`masked_softmax`).
        User predicates are evaluated per block at global indices; score
        functions are not supported.
    threads : int, optional
        fastmask threads per task (default: :func:`task_threads`' rule).

    Returns
    -------
    dask.array.Array or (dask.array.Array, dask.array.Array)
        The output ``batch + (Lq, Dv)``, and with ``return_weights`` the weights
        ``batch + (Lq, Lk)``.
    """
    qd, kd, vd = as_dask(q, "q"), as_dask(k, "k"), as_dask(v, "v")
    ops = (describe(a, name) for a, name in ((qd, "q"), (kd, "k"), (vd, "v")))
    batch, group, _, lq, d, lk, dv, s = attention_dims(*ops, scale, return_weights)
    nb = len(batch)
    threads = check_threads(threads)
    strategy, dense = split_mask(mask)
    scores = (*batch, lq, lk)
    if strategy is not None and getattr(strategy, "compiled", False):
        if strategy.plan(scores).score is not None:
            raise ValueError(
                "fastmask.dask.attention does not take score functions (masks.score); "
                "they are masked_softmax only"
            )
    bias = prepare_bias(bias)
    head_axis = nb - 1 if group > 1 else None

    qd, kd, vd = pad(qd, nb + 2), pad(kd, nb + 2), pad(vd, nb + 2)
    # The output's chunks along each batch axis: q's where q spans it, else k/v's.
    out_chunks: list[tuple[int, ...]] = []
    for i, n in enumerate(batch):
        if qd.shape[i] == n:
            out_chunks.append(qd.chunks[i])
        elif head_axis != i and kd.shape[i] == n:
            out_chunks.append(kd.chunks[i])
        elif head_axis != i and vd.shape[i] == n:
            out_chunks.append(vd.chunks[i])
        else:
            out_chunks.append((n,))
    q_lead = tuple(qd.shape[i] == n and n != 1 for i, n in enumerate(batch))
    k_lead = tuple(i != head_axis and kd.shape[i] == n and n != 1 for i, n in enumerate(batch))
    v_lead = tuple(i != head_axis and vd.shape[i] == n and n != 1 for i, n in enumerate(batch))
    lk_chunks = kd.chunks[-2]
    split = len(lk_chunks) > 1

    def chunked(a: da.Array, follows: tuple[bool, ...], tail: tuple) -> da.Array:
        want = tuple(out_chunks[i] if follows[i] else (int(a.shape[i]),) for i in range(nb))
        want += tail
        return a if a.chunks == want else a.rechunk(want)

    qd = chunked(qd, q_lead, (qd.chunks[-2], (d,)))
    kd = chunked(kd, k_lead, (lk_chunks, (d,)))
    vd = chunked(vd, v_lead, (lk_chunks, (dv,)))

    score_chunks = (*out_chunks, qd.chunks[-2], lk_chunks)
    prep = prepare(strategy, dense, bias, scores, score_chunks, "the scores'")
    mspec = prep.spec(scores, qd.dtype, s, backend, threads)
    spec = AttentionSpec(mspec, bool(return_weights), group, head_axis, dv)
    dtype = qd.dtype

    # blockwise indices: batch axes 0..nb-1, Lq = nb, then Dv (whole keys) or the
    # key chunk and the packed axis (split keys); fresh indices are contracted
    fresh = iter(range(nb + 3, 10_000))
    kc = nb + 1  # the key-chunk index (split keys only)

    def ind(follows: tuple[bool, ...], *tail: int) -> tuple[int, ...]:
        return tuple(i if follows[i] else next(fresh) for i in range(nb)) + tail

    key_ind = kc if split else None
    args: list[Any] = [
        qd, ind(q_lead, nb, next(fresh)),
        kd, ind(k_lead, key_ind if split else next(fresh), next(fresh)),
        vd, ind(v_lead, key_ind if split else next(fresh), next(fresh) if split else kc),
    ]  # fmt: skip
    blk_ind = (*range(nb), nb, kc)
    table = prep.table(score_chunks)
    blk_chunks = (*out_chunks, qd.chunks[-2], (1,) * len(lk_chunks) if split else (dv,))
    blocks = ArrayValuesDep(blk_chunks, table)
    args += [blocks, blk_ind]
    for op in prep.dask_ops:
        follows = tuple(op.shape[i] == batch[i] and batch[i] != 1 for i in range(nb))
        q_ind = nb if op.shape[nb] == lq and lq != 1 else next(fresh)
        k_ind = kc if split and op.shape[nb + 1] == lk and lk != 1 else next(fresh)
        args += [op, ind(follows, q_ind, k_ind)]
    token = dask.base.tokenize(qd, kd, vd, *prep.dask_ops, blocks, spec)
    kw = {"concatenate": True, "align_arrays": False}

    if not split:
        out_ind = (*range(nb), nb, kc)  # kc is v's Dv axis here (one chunk)
        new_axes: dict = {}
        out_meta = np.empty((0,) * (nb + 2), dtype)
        if not return_weights:
            return da.blockwise(
                attention_task, out_ind, *args, spec=spec, dtype=dtype, meta=out_meta,
                new_axes=new_axes, name=f"fastmask-attention-{token}", **kw,
            )  # fmt: skip
        pair = da.blockwise(
            attention_task, out_ind, *args, spec=spec, dtype=object,
            meta=np.empty((0,) * (nb + 2), object), new_axes=new_axes,
            name=f"fastmask-attention-pair-{token}", **kw,
        )  # fmt: skip
        out = da.map_blocks(
            operator.getitem, pair, 0, dtype=dtype, meta=out_meta,
            name=f"fastmask-attention-out-{token}",
        )  # fmt: skip
        weights = da.map_blocks(
            operator.getitem, pair, 1, dtype=dtype, meta=out_meta,
            chunks=(*pair.chunks[:-1], (lk,)), name=f"fastmask-attention-weights-{token}",
        )  # fmt: skip
        return out, weights

    # keys split along Lk: one task per (block of queries, chunk of keys), then a merge
    nd_p = nb + 3
    part_ind = (*range(nb), nb, kc, nb + 2)
    part_kw = dict(
        adjust_chunks={kc: 1}, new_axes={nb + 2: dv + 2}, spec=spec, **kw,
    )  # fmt: skip
    f64_meta = np.empty((0,) * nd_p, np.float64)
    if return_weights:
        pair = da.blockwise(
            attention_part_task, part_ind, *args, dtype=object,
            meta=np.empty((0,) * nd_p, object), name=f"fastmask-attention-parts-{token}",
            **part_kw,
        )  # fmt: skip
        packed = da.map_blocks(
            operator.getitem, pair, 0, dtype=np.float64, meta=f64_meta,
            name=f"fastmask-attention-packed-{token}",
        )  # fmt: skip
        chunk_p = da.map_blocks(
            operator.getitem, pair, 1, dtype=mspec.compute_dtype,
            chunks=(*out_chunks, qd.chunks[-2], lk_chunks, (1,)),
            meta=np.empty((0,) * nd_p, mspec.compute_dtype),
            name=f"fastmask-attention-chunk-weights-{token}",
        )[..., 0]  # fmt: skip
    else:
        packed = da.blockwise(
            attention_part_task, part_ind, *args, dtype=np.float64, meta=f64_meta,
            name=f"fastmask-attention-parts-{token}", **part_kw,
        )  # fmt: skip
    packed = packed.rechunk({kc: -1})  # every key chunk of a row together
    out = da.map_blocks(
        attention_merge_task, packed, dv=dv, out_dtype=dtype, dtype=dtype, drop_axis=kc,
        chunks=(*out_chunks, qd.chunks[-2], (dv,)), meta=np.empty((0,) * (nb + 2), dtype),
        name=f"fastmask-attention-merge-{token}",
    )  # fmt: skip
    if not return_weights:
        return out
    w = da.map_blocks(
        attention_weights_task, packed[..., dv:], dtype=np.float64, drop_axis=nd_p - 1,
        meta=np.empty((0,) * (nb + 2), np.float64), name=f"fastmask-attention-w-{token}",
    )  # fmt: skip
    w = w.rechunk({kc: 1})
    weights = da.map_blocks(
        scale_weights_task, chunk_p, w, out_dtype=dtype, dtype=dtype,
        meta=np.empty((0,) * (nb + 2), dtype), name=f"fastmask-attention-scaled-weights-{token}",
    )  # fmt: skip
    return out, weights
