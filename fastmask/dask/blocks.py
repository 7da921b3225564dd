"""What each task gets besides its dask inputs, and what it hands the in-memory call.

The logits are split into blocks by their dask chunks. *Structured masks*
(``padding``, ``causal``, ``sliding_window``, ``segments``, ``prefix_lm``, their
``&`` compositions, plugin strategies) are evaluated **once, on the client**,
for the global shape: ``strategy.plan(global_shape)`` gives the kept key
interval ``[lo, hi)`` of every row (at most ``B*H*Q`` of them, usually a
broadcast array far smaller). :func:`block_table` gives each block only its own
rows' intervals, already shifted by the block's first key, and its slices of
the dense NumPy operands (``keep``/``drop`` arrays, a NumPy ``bias``,
``segments`` whose ids are not contiguous runs). The table is embedded in the
tasks themselves (an :class:`ArrayValuesDep` of per-block constants: no extra
tasks, nothing fetched between workers). No mask is materialised and nothing
is shipped per element; dask operands are read block by block.

In the task, :func:`block_inputs` turns a :class:`Block` (and the block's dask
operands) into the in-memory call's ``(logits, plan, bias, scale)``, and
:class:`BlockMask` hands the kernel that plan as is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..masks import MaskStrategy
from ..masks.base import MaskPlan, canonical_dims
from ..request import compute_dtype
from .user_functions import Shipped, offsets, predicate_block, score_block

try:
    from dask.layers import ArrayValuesDep
except ImportError:  # pragma: no cover - a dask that moved it: the same thing, here
    from dask.blockwise import BlockwiseDep

    class ArrayValuesDep(BlockwiseDep):  # type: ignore[no-redef]
        """Per-block constants of a blockwise call, looked up by block index."""

        produces_tasks = False

        def __init__(self, chunks, values) -> None:
            self.chunks = chunks
            self.numblocks = tuple(len(c) for c in chunks)
            self.values = values

        def __getitem__(self, idx):
            return self.values[idx]


__all__ = [
    "ArrayValuesDep",
    "Block",
    "BlockMask",
    "Spec",
    "aligned",
    "block_inputs",
    "block_table",
    "kept",
    "rows_to_nd",
]


class BlockMask(MaskStrategy):
    """A block's mask as a ready plan: intervals already shifted to the block."""

    def __init__(self, plan: MaskPlan) -> None:
        self._plan = plan
        self.structured = plan.lo is not None

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        return self._plan

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return kept(self._plan, tuple(shape))

    @property
    def key(self) -> Any:
        return ("fastmask.dask block", self._plan.keep is not None, self._plan.lo is not None)

    def __repr__(self) -> str:
        return "fastmask.dask block mask"


def kept(plan: MaskPlan | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The plan as a full boolean array of ``shape`` (None: everything kept)."""
    if plan is None:
        return None
    out = None
    if plan.lo is not None:
        b, h, q, n = canonical_dims(shape)
        k = np.arange(n)
        lo = np.broadcast_to(plan.lo, (b, h, q))[..., None]
        hi = np.broadcast_to(plan.hi, (b, h, q))[..., None]
        out = ((k >= lo) & (k < hi)).reshape(shape)
    if plan.keep is not None:
        dense = np.broadcast_to(plan.keep, shape)
        out = dense if out is None else out & dense
    return out


def rows_to_nd(a: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Interval array broadcastable to canonical ``(B, H, Q)`` -> ``rows + (1,)`` for ``shape``.

    Axes along which the intervals do not vary keep size 1.
    """
    nd = len(shape)
    a = np.asarray(a, dtype=np.int64)
    a3 = a.reshape((1,) * (3 - a.ndim) + a.shape)
    if nd >= 3:
        b, h, q = a3.shape
        mid = tuple(shape[1:-2])
        rows = (b, *((1,) * len(mid) if h == 1 else mid), q)
        return np.ascontiguousarray(a3).reshape(rows)[..., None]
    if nd == 2:
        return a3.reshape(a3.shape[2:])[..., None]
    return a3.reshape(())[..., None]


def _rows_canonical(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A block of a ``rows + (1,)`` interval array -> broadcastable to the block's ``(b, h, q)``."""
    r = a[..., 0]
    nd = len(shape)
    if nd >= 3:
        if all(m == 1 for m in r.shape[1:-1]):
            return r.reshape(r.shape[0], 1, r.shape[-1])
        _, h, _, _ = canonical_dims(shape)
        full = np.broadcast_to(r, (r.shape[0], *shape[1:-2], r.shape[-1]))
        return full.reshape(r.shape[0], h, r.shape[-1])
    return r.reshape(1, 1, -1)


class Block(NamedTuple):
    """What one task gets besides its dask inputs (embedded in the task; small).

    ``keep`` and ``bias`` are the block's slices of the dense NumPy operands
    (size 1 along the axes they broadcast along); ``lo``/``hi`` the rows' kept
    key intervals, relative to the block's first key and broadcastable to the
    block's canonical ``(b, h, q)``.
    """

    loc: tuple[tuple[int, int], ...]  # global (start, stop) along every axis
    keep: np.ndarray | None
    bias: np.ndarray | None
    lo: np.ndarray | None
    hi: np.ndarray | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in self.loc)


def _slice(a: np.ndarray | None, loc: tuple[tuple[int, int], ...]) -> np.ndarray | None:
    if a is None:
        return None
    return a[
        tuple(
            slice(None) if d == 1 else slice(s, e) for d, (s, e) in zip(a.shape, loc, strict=True)
        )
    ]


def block_table(
    chunks: tuple[tuple[int, ...], ...],
    keep: np.ndarray | None,
    bias: np.ndarray | None,
    lo: np.ndarray | None,
    hi: np.ndarray | None,
) -> dict[tuple[int, ...], Block]:
    """Every block's :class:`Block`, by block index (computed on the client)."""
    starts = [np.cumsum((0, *c)).tolist() for c in chunks]
    table = {}
    for idx in itertools.product(*(range(len(c)) for c in chunks)):
        loc = tuple((starts[i][j], starts[i][j + 1]) for i, j in enumerate(idx))
        shape = tuple(e - s for s, e in loc)
        blo = bhi = None
        if lo is not None:
            k0 = loc[-1][0]
            blo = _rows_canonical(_slice(lo, loc), shape) - k0
            bhi = _rows_canonical(_slice(hi, loc), shape) - k0
        table[idx] = Block(loc, _slice(keep, loc), _slice(bias, loc), blo, bhi)
    return table


@dataclass(frozen=True)
class Spec:
    """Everything the tasks of one call share (small; embedded in every task)."""

    gshape: tuple[int, ...]  # the global logits (or scores) shape, softmax axis last
    dtype: np.dtype
    scale: float
    backend: str | None
    threads: int | None
    n_keep: int  # dense keep masks that are dask arrays (first among the dask operands)
    dask_bias: bool  # the bias is a dask array (after them)
    predicate: Shipped | None
    score: Shipped | None

    @property
    def compute_dtype(self) -> np.dtype:
        return compute_dtype(self.dtype)

    @property
    def n_dask(self) -> int:
        return self.n_keep + int(self.dask_bias)

    def __dask_tokenize__(self) -> Any:
        return (
            "fastmask.dask.Spec", self.gshape, str(self.dtype), self.scale, self.backend,
            self.threads, self.n_keep, self.dask_bias,
            None if self.predicate is None else self.predicate.token,
            None if self.score is None else self.score.token,
        )  # fmt: skip


def aligned(a: Any) -> Any:
    """``a``, copied if its data is not aligned to its itemsize.

    Blocks deserialised by ``dask.distributed`` can sit at any byte offset in
    a message buffer; fastmask's compiled kernels require aligned data.
    """
    if isinstance(a, np.ndarray) and not a.flags.aligned:
        return a.copy()
    return a


def block_inputs(
    spec: Spec, blk: Block, xb: Any, dops: tuple
) -> tuple[Any, MaskPlan | None, np.ndarray | None, float | None]:
    """``(logits, plan, bias, scale)`` of one block, for the in-memory call.

    ``xb`` is the block of the logits (None for attention: no score functions
    there); ``dops`` the block's dask operands (dense keep masks, then bias).
    """
    shape = blk.shape
    keep = aligned(blk.keep)
    for a in dops[: spec.n_keep]:
        a = aligned(np.asarray(a, dtype=bool))
        keep = a if keep is None else np.logical_and(keep, a)
    bias = aligned(dops[spec.n_keep] if spec.dask_bias else blk.bias)
    lo, hi = blk.lo, blk.hi
    scale: float | None = spec.scale
    if spec.predicate is not None or spec.score is not None:
        off = offsets(spec.gshape, list(blk.loc))
        if spec.predicate is not None:
            grid = predicate_block(spec.predicate, shape, lo, hi, off)
            keep = grid if keep is None else np.logical_and(keep, grid)
        if spec.score is not None:
            cdt = spec.compute_dtype
            z = np.array(xb, dtype=cdt)  # a fresh, contiguous copy
            if spec.scale != 1.0:
                z *= cdt.type(spec.scale)
            if bias is not None:
                z += np.asarray(bias).astype(cdt, copy=False)
            score_block(spec.score, z, lo, hi, off)
            xb, bias, scale = z, None, None
    plan = None if keep is None and lo is None else MaskPlan(keep=keep, lo=lo, hi=hi)
    return aligned(xb), plan, bias, scale
