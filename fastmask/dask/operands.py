"""A call's operands on the client: validated, aligned with the logits' chunks, sorted.

Every check of the in-memory call is made here, at call time, before anything
runs. The mask is split into a strategy evaluated on the client
(:func:`split_mask`) and dense keep arrays read per block; :func:`prepare`
sorts the masks and the bias into dask operands (rechunked to the logits'
chunks) and NumPy constants that each block receives its slice of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from ..masks import MaskStrategy
from ..masks.base import AllOf
from ..masks.dense import DenseMask
from ..rules import BIAS_HINT, Operand, check_bool_mask, check_broadcast, check_float, ndim_error
from .blocks import Block, Spec, block_table, rows_to_nd
from .lazy_dense import LazyDense
from .user_functions import Shipped

__all__ = [
    "Prepared",
    "as_dask",
    "describe",
    "move_last",
    "pad",
    "prepare",
    "prepare_bias",
    "split_mask",
]


def as_dask(a: Any, what: str) -> da.Array:
    """``a`` as a dask array with known chunks (a NumPy array: one chunk)."""
    if isinstance(a, da.Array):
        arr = a
    else:
        if hasattr(a, "__cuda_array_interface__"):
            raise TypeError(f"{what} is a GPU device array; fastmask.dask works on host arrays")
        a = np.asarray(a)
        arr = da.from_array(a, chunks=a.shape or ())
    if any(math.isnan(c) for cs in arr.chunks for c in cs):
        raise ValueError(f"{what} has unknown chunk sizes; call .compute_chunk_sizes() on it first")
    return arr


def describe(a: Any, what: str) -> Operand:
    """The rules' description of a dask or NumPy operand."""
    if isinstance(a, da.Array):
        return Operand.of_dask(a, what)
    return Operand.of_host(a, what)


def pad(a: Any, nd: int) -> Any:
    """``a`` (dask or NumPy) with leading size-1 axes up to ``nd`` axes."""
    extra = nd - a.ndim
    if extra <= 0:
        return a
    return a[(None,) * extra] if isinstance(a, da.Array) else np.reshape(a, (1,) * extra + a.shape)


def _fit(a: Any, shape: tuple, what: str, whose: str) -> Any:
    """``a`` with ``len(shape)`` axes, checked to broadcast to ``shape`` (no copy).

    ``whose`` names the target in errors: "x's", "the scores'".
    """
    check_broadcast(describe(a, what), shape, whose)
    return pad(a, len(shape))


def _align(a: da.Array, shape: tuple, chunks: tuple, what: str, whose: str) -> da.Array:
    """A dask operand with the target's chunks (size-1 broadcast axes: one chunk)."""
    a = _fit(a, shape, what, whose)
    want = tuple(c if d == s else (1,) for d, s, c in zip(a.shape, shape, chunks, strict=True))
    return a if a.chunks == want else a.rechunk(want)


def split_mask(mask: Any) -> tuple[MaskStrategy | None, list[Any]]:
    """``(strategy evaluated on the client, dense keep arrays read per block)``."""
    if mask is None:
        return None, []
    # Dense masks (lazy or in memory) are operands read per block, so that they move
    # with the logits when the softmax axis is not the last one, as in memory.
    dense_kinds = (LazyDense, DenseMask)
    if isinstance(mask, dense_kinds):
        return None, [mask.array]
    if isinstance(mask, AllOf):
        lazy = [p.array for p in mask.parts if isinstance(p, dense_kinds)]
        rest = [p for p in mask.parts if not isinstance(p, dense_kinds)]
        if not lazy:
            return mask, []
        strategy = None if not rest else rest[0] if len(rest) == 1 else AllOf(tuple(rest))
        return strategy, lazy
    if isinstance(mask, MaskStrategy):
        return mask, []
    m = mask if isinstance(mask, da.Array) else np.asarray(mask)
    check_bool_mask(describe(m, "mask"))
    return None, [m]


@dataclass
class Prepared:
    """A call's mask and bias, split into dask operands and per-block constants."""

    dask_ops: list[da.Array]
    n_keep: int
    dask_bias: bool
    keep: np.ndarray | None  # the NumPy dense masks, ANDed (broadcast shape)
    bias: np.ndarray | None
    lo: np.ndarray | None  # rows + (1,) intervals
    hi: np.ndarray | None
    predicate: Shipped | None
    score: Shipped | None

    def table(self, chunks: tuple) -> dict[tuple[int, ...], Block]:
        return block_table(chunks, self.keep, self.bias, self.lo, self.hi)

    def spec(self, gshape, dtype, scale, backend, threads) -> Spec:
        return Spec(
            gshape, np.dtype(dtype), scale, backend, threads, self.n_keep, self.dask_bias,
            self.predicate, self.score,
        )  # fmt: skip


def prepare(
    strategy: MaskStrategy | None,
    dense: list[Any],
    bias: Any,
    gshape: tuple[int, ...],
    chunks: tuple,
    whose: str,
) -> Prepared:
    """Evaluate the strategy on the global shape and sort the operands (on the client).

    ``gshape`` and ``chunks`` are the logits' (or scores'), softmax axis last;
    ``whose`` names them in errors ("x's", "the scores'").
    """
    plan = strategy.plan(gshape) if strategy is not None else None
    keep_arrays = list(dense)
    if plan is not None and plan.keep is not None:
        keep_arrays.append(plan.keep)
    dask_ops: list[da.Array] = []
    np_keep = None
    for a in keep_arrays:
        if isinstance(a, da.Array):
            dask_ops.append(_align(a, gshape, chunks, "mask", whose))
        else:
            a = _fit(np.asarray(a, dtype=bool), gshape, "mask", whose)
            np_keep = a if np_keep is None else np.logical_and(np_keep, a)
    n_keep = len(dask_ops)
    np_bias = None
    if isinstance(bias, da.Array):
        dask_ops.append(_align(bias, gshape, chunks, "bias", whose))
    elif bias is not None:
        np_bias = _fit(bias, gshape, "bias", whose)
    lo = hi = None
    if plan is not None and plan.lo is not None:
        lo, hi = rows_to_nd(plan.lo, gshape), rows_to_nd(plan.hi, gshape)
    return Prepared(
        dask_ops, n_keep, isinstance(bias, da.Array), np_keep, np_bias, lo, hi,
        None if plan is None or plan.predicate is None else Shipped(plan.predicate),
        None if plan is None or plan.score is None else Shipped(plan.score),
    )  # fmt: skip


def prepare_bias(bias: Any) -> Any:
    """The bias as a dask or NumPy array, its dtype checked (None stays None)."""
    if bias is None:
        return None
    b = bias if isinstance(bias, da.Array) else np.asarray(bias)
    check_float(describe(b, "bias"), BIAS_HINT)
    return b


def move_last(a: Any, ax: int, nd: int, what: str) -> Any:
    """A dense operand of logits with ``nd`` axes, with axis ``ax`` moved last."""
    if a.ndim > nd:
        raise ndim_error(what, a.ndim, "x's", nd)
    a = pad(a, nd)
    return da.moveaxis(a, ax, -1) if isinstance(a, da.Array) else np.moveaxis(a, ax, -1)
