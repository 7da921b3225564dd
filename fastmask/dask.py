"""Masked softmax and attention on dask arrays (the optional ``fastmask[dask]`` extra).

``import fastmask`` never imports dask; ``import fastmask.dask`` does. Every
function here takes :mod:`dask.array` inputs and returns a lazy dask array;
nothing runs until it is computed.

How a call is laid out
----------------------
*Blocks.* The logits are split into blocks by their dask chunks. Blocks along
the batch, head and query axes are independent: each is one task that calls
:func:`fastmask.masked_softmax` (or :func:`fastmask.attention`) on that block.

*Structured masks* (``padding``, ``causal``, ``sliding_window``, ``segments``,
``prefix_lm``, their ``&`` compositions, plugin strategies) are evaluated
**once, on the client**, for the global shape: ``strategy.plan(global_shape)``
gives the kept key interval ``[lo, hi)`` of every row (at most ``B*H*Q`` of
them, usually a broadcast array far smaller). Each task is then given only its
own rows' intervals, already shifted by the block's first key (for blocks along
the softmax axis), embedded in the task itself (a ``dask.layers.ArrayValuesDep``
table of per-block constants: no extra tasks, nothing fetched between workers)
and handed to the kernel as the block's plan. No mask is materialised and
nothing is shipped per element. Dense NumPy operands (``keep``/``drop`` arrays,
a NumPy ``bias``, ``segments`` whose ids are not contiguous runs) travel the
same way, each task with its slice; dask operands are read block by block.

*User predicates and score functions* (:func:`fastmask.masks.predicate`,
:func:`fastmask.masks.score`) see global indices: each task evaluates the
function for its block's global ``(b, h, q_idx, k_idx)`` (inside the rows'
kept intervals) with a Numba loop compiled once per worker process, and
passes the result to the kernel as the block's keep mask (predicates: a
boolean array the size of the block, made on the worker) or as rewritten
logits (score functions). The function itself travels as a Numba dispatcher
(its Python code, a few kB); it is compiled once per process. (The kernels'
fused predicate path takes a head offset but no batch/query/key offsets, so
blocks cannot use it with global indices.)

*Rows split along the softmax axis* (the last axis has several chunks): a
two-pass reduction. Pass one computes, per block and row, the maximum ``m``
of the kept logits and ``s = sum(exp(z - m))`` over the kept positions (NaN
for a row whose kept logits contain NaN or ``+inf``). These per-chunk
statistics (two floats per row and chunk) are combined per row into weights
``w_c = s_c * exp(m_c - M) / S`` with ``M = max_c m_c`` and
``S = sum_c s_c * exp(m_c - M)``. Pass two runs the fastmask kernel on each
block (a softmax over the block's part of the row) and multiplies it by the
block's ``w_c``. A row in which nothing is kept in any chunk is all zeros;
a NaN (or kept ``+inf``) anywhere in a row makes the whole row NaN, as in
memory.

*Attention.* The output's blocks follow ``q``'s chunks along the batch, head
and query axes; ``k``/``v`` follow them along the batch axes they span. With
one chunk of keys, each block is one :func:`fastmask.attention` call against
all keys (grouped-query heads are sliced per block). With keys chunked along
``Lk``, each (block of queries, chunk of keys) pair is a task that computes the
block's scores, runs the kernel on them and returns its normalised partial
output with the rows' ``(m, s)``; the partials are merged with the weights
``w_c`` above.

Threads inside tasks
--------------------
fastmask's kernels are multi-threaded; so are dask's workers. By default each
task runs fastmask with :func:`task_threads` threads:

* in a ``dask.distributed`` worker: ``max(1, cores // worker threads)``, capped
  by ``OMP_NUM_THREADS`` when that is set. Worker processes started by a
  nanny (the default for ``LocalCluster`` and ``dask worker``) have
  ``OMP_NUM_THREADS=1`` (dask's ``distributed.nanny.pre-spawn-environ``), so
  there each task runs single-threaded: dask's parallelism over tasks is the
  parallelism. Threaded workers in the client process (``processes=False``)
  split the cores between their threads.
* in dask's local threaded scheduler: ``max(1, cores // pool threads)``.
* otherwise (the synchronous scheduler, plain calls): fastmask's own setting.

``FASTMASK_NUM_THREADS`` set in a worker's environment, or ``threads=n`` given to
a call here, overrides the rule. While a task runs, fastmask's process-wide
thread count is set to that number (tasks running at the same time in one
process share it; the setting in force before them comes back when the last
one ends).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import operator
import os
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fastmask.dask needs dask: pip install 'fastmask[dask]' (dask[array] and distributed)"
    ) from exc
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


from . import api as _api
from .attention import attention as _in_memory_attention
from .attention_request import _shapes as _attention_shapes
from .masks import MaskStrategy
from .masks.base import AllOf, MaskPlan, canonical_dims
from .request import (
    _COMPUTE,
    FLOAT_DTYPES,
    _scale,
    mask_dtype_error,
    softmax_axis,
    structured_axis_error,
)
from .threads import available_cpus, get_num_threads, set_num_threads

__all__ = ["attention", "drop", "keep", "masked_softmax", "task_threads"]


# --------------------------------------------------------------------------
# threads inside tasks


def _env_threads(var: str) -> int | None:
    raw = os.environ.get(var, "").split(",")[0].strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


def _distributed_worker() -> Any:
    """The ``dask.distributed`` worker running the current task, or None."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except (ValueError, AttributeError):
        return None


def _worker_nthreads(worker: Any) -> int:
    state = getattr(worker, "state", None)
    n = getattr(state, "nthreads", None) or getattr(worker, "nthreads", None) or 1
    return max(1, int(n))


def _threaded_pool_size() -> int | None:
    """Threads of dask's local threaded scheduler pool running this thread, or None."""
    me = threading.current_thread()
    if me is threading.main_thread():
        return None
    threaded = sys.modules.get("dask.threaded")
    if threaded is None:
        return None
    pools = [getattr(threaded, "default_pool", None)]
    try:
        for per_thread in list(getattr(threaded, "pools", {}).values()):
            pools.extend(list(per_thread.values()))
    except RuntimeError:  # changed while we looked: not worth more than a guess
        pass
    for pool in pools:
        if pool is None:
            continue
        # a pool thread may run its first task before the pool has recorded it in
        # _threads; its name (prefix + "_" + number) says whose it is from the start
        prefix = getattr(pool, "_thread_name_prefix", None)
        if me in getattr(pool, "_threads", ()) or (prefix and me.name.rpartition("_")[0] == prefix):
            return max(1, int(getattr(pool, "_max_workers", 1)))
    return None


def task_threads(threads: int | None = None) -> int | None:
    """How many threads fastmask uses for one task running in this thread.

    Parameters
    ----------
    threads : int, optional
        An explicit count (returned as is).

    Returns
    -------
    int or None
        ``threads`` if given; else ``FASTMASK_NUM_THREADS`` when it is set in this
        process's environment; in a ``dask.distributed``
        worker ``max(1, cores // worker threads)``, capped by ``OMP_NUM_THREADS``
        when set (dask's nanny sets it to 1 in worker processes); in dask's
        local threaded scheduler ``max(1, cores // pool threads)``; otherwise
        None (fastmask's own setting).
    """
    if threads is not None:
        return _check_threads(threads)
    pinned = _env_threads("FASTMASK_NUM_THREADS")
    if pinned is not None:  # read now: the process may have imported fastmask before it was set
        return pinned
    cores = available_cpus()
    worker = _distributed_worker()
    if worker is not None:
        n = max(1, cores // _worker_nthreads(worker))
        omp = _env_threads("OMP_NUM_THREADS")
        return n if omp is None else min(n, omp)
    pool = _threaded_pool_size()
    if pool is not None:
        return max(1, cores // pool)
    return None


def _check_threads(threads: Any) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be an int >= 1 or None; got {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1; got {threads}")
    return int(threads)


_scope_lock = threading.Lock()
_scope_depth = 0
_scope_saved = 1


@contextlib.contextmanager
def _thread_scope(n: int | None):
    """Run with fastmask's thread count set to ``n`` (None: leave it alone).

    Tasks running at the same time in one process share the count set by the
    first of them; the previous count comes back when the last one ends.
    """
    global _scope_depth, _scope_saved
    if n is None:
        yield
        return
    with _scope_lock:
        if _scope_depth == 0:
            _scope_saved = get_num_threads()
            set_num_threads(n)
        _scope_depth += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                set_num_threads(_scope_saved)


# --------------------------------------------------------------------------
# lazy dense masks


class LazyDense(MaskStrategy):
    """A dense mask held as a dask array (see :func:`keep` and :func:`drop`).

    Composes with ``&`` like every strategy. The functions of
    :mod:`fastmask.dask` read it block by block; the in-memory functions
    compute it first.
    """

    structured = False

    def __init__(self, array: Any, convention: str) -> None:
        a = array if isinstance(array, da.Array) else da.asarray(array)
        if a.dtype.kind not in "biuf":
            raise TypeError(
                f"fastmask.dask.{convention}() takes a boolean or numeric array; "
                f"got dtype {a.dtype}"
            )
        nonzero = a if a.dtype == np.bool_ else a != 0
        self.convention = convention
        self.array = nonzero if convention == "keep" else ~nonzero  # True = attend

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        try:
            np.broadcast_shapes(self.array.shape, tuple(shape))
        except ValueError:
            raise ValueError(
                f"mask of shape {self.array.shape} does not broadcast to the logits' shape {shape}"
            ) from None
        return MaskPlan(keep=np.asarray(self.array))

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.array), shape)

    def __repr__(self) -> str:
        return f"fastmask.dask.{self.convention}(<{self.array.shape} dask array>)"


def keep(a: Any) -> LazyDense:
    """A dense mask from a dask array where nonzero/True means *attend* (read lazily).

    ``fastmask.masks.keep`` converts its argument to NumPy at once (computing a
    dask array); this one keeps it lazy. Composes with ``&``.
    """
    return LazyDense(a, "keep")


def drop(a: Any) -> LazyDense:
    """A dense mask from a dask array where nonzero/True means *masked out* (read lazily)."""
    return LazyDense(a, "drop")


# --------------------------------------------------------------------------
# user predicates and score functions, with global indices


_PROCESS_TOKEN = uuid.uuid4().hex
_shipped_lock = threading.Lock()
_shipped: dict[str, Any] = {}  # token -> dispatcher, one per process
_MAX_SHIPPED = 64
_loops: tuple | None = None


class _Shipped:
    """A user predicate or score function as tasks receive it.

    It travels as its Numba dispatcher (Python code, not machine code); the first
    copy unpickled in a process is kept, so it is compiled once per process.
    """

    def __init__(self, fn: Any) -> None:
        import numba

        self.kind = getattr(fn, "kind", "function")
        self.name = getattr(fn, "name", repr(fn))
        jitted = getattr(fn, "_jitted", None)
        self.dispatcher = jitted() if callable(jitted) else numba.njit(fn.fn)
        # the same function object gets the same token in every call from this
        # process, so workers reuse what they compiled for it
        self.token = f"{_PROCESS_TOKEN}:{getattr(fn, 'key', id(fn))!r}"

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        with _shipped_lock:
            known = _shipped.get(self.token)
            if known is None:
                if len(_shipped) >= _MAX_SHIPPED:
                    _shipped.pop(next(iter(_shipped)))
                _shipped[self.token] = self.dispatcher
            else:
                self.dispatcher = known

    def failed(self, b: int, h: int, q: int, k_range: range, score: bool) -> None:
        """Raise the error of one row, found by running the function in Python."""
        py = self.dispatcher.py_func
        where = f"b={b}, h={h}, q_idx={q}"
        for k in k_range:
            try:
                py(0.0, b, h, q, k) if score else py(b, h, q, k)
            except Exception as exc:
                raise ValueError(
                    f"{self.kind} {self.name!r} raised {type(exc).__name__} at "
                    f"({where}, k_idx={k}): {exc}"
                ) from exc
        raise ValueError(
            f"{self.kind} {self.name!r} raised an exception in its compiled code on the row "
            f"({where})"
        )

    def __dask_tokenize__(self) -> Any:
        return ("fastmask.dask._Shipped", self.token)


def _user_loops() -> tuple:
    """The two Numba loops that evaluate user functions at global indices (compiled once)."""
    global _loops
    if _loops is None:
        import numba

        def pred_grid(pred, keep, lo, hi, b0, hidx, q0, k0):
            nb, nh, nq, _ = keep.shape
            for b in range(nb):
                for h in range(nh):
                    for q in range(nq):
                        try:
                            for k in range(lo[b, h, q], hi[b, h, q]):
                                keep[b, h, q, k] = pred(b0 + b, hidx[h], q0 + q, k0 + k)
                        except Exception:
                            return (b * nh + h) * nq + q
            return -1

        def score_grid(fn, z, lo, hi, b0, hidx, q0, k0):
            nb, nh, nq, _ = z.shape
            for b in range(nb):
                for h in range(nh):
                    for q in range(nq):
                        try:
                            for k in range(lo[b, h, q], hi[b, h, q]):
                                z[b, h, q, k] = fn(z[b, h, q, k], b0 + b, hidx[h], q0 + q, k0 + k)
                        except Exception:
                            return (b * nh + h) * nq + q
            return -1

        _loops = (numba.njit(pred_grid), numba.njit(score_grid))
    return _loops


@dataclass(frozen=True)
class _Offsets:
    """Where a block sits in the global canonical ``(B, H, Q, N)`` grid."""

    b0: int
    hidx: np.ndarray  # global flat head index of each of the block's heads
    q0: int
    k0: int


def _offsets(gshape: tuple[int, ...], loc: list[tuple[int, int]]) -> _Offsets:
    nd = len(gshape)
    b0 = loc[0][0] if nd >= 3 else 0
    q0 = loc[-2][0] if nd >= 2 else 0
    k0 = loc[-1][0]
    mid = tuple(gshape[1:-2]) if nd >= 4 else ()
    if mid:
        ranges = [np.arange(s, e, dtype=np.int64) for s, e in loc[1:-2]]
        grids = np.meshgrid(*ranges, indexing="ij")
        hidx = np.ravel_multi_index(grids, mid).reshape(-1).astype(np.int64)
    else:
        hidx = np.zeros(1, np.int64)
    return _Offsets(b0, hidx, q0, k0)


def _row_limits(lo: np.ndarray | None, hi: np.ndarray | None, shape4: tuple) -> tuple:
    b, h, q, n = shape4
    if lo is None:
        return np.zeros((b, h, q), np.int64), np.full((b, h, q), n, np.int64)
    lo4 = np.ascontiguousarray(np.broadcast_to(np.clip(lo, 0, n), (b, h, q)), dtype=np.int64)
    hi4 = np.ascontiguousarray(np.broadcast_to(np.clip(hi, 0, n), (b, h, q)), dtype=np.int64)
    return lo4, hi4


def _predicate_block(fn: _Shipped, shape: tuple, lo: Any, hi: Any, off: _Offsets) -> np.ndarray:
    shape4 = canonical_dims(shape)
    keep = np.zeros(shape4, np.bool_)
    if keep.size:
        lo4, hi4 = _row_limits(lo, hi, shape4)
        failed = _user_loops()[0](fn.dispatcher, keep, lo4, hi4, off.b0, off.hidx, off.q0, off.k0)
        if failed >= 0:
            _raise_row(fn, failed, shape4, lo4, hi4, off, score=False)
    return keep.reshape(shape)


def _score_block(fn: _Shipped, z: np.ndarray, lo: Any, hi: Any, off: _Offsets) -> None:
    shape4 = canonical_dims(z.shape)
    if z.size:
        z4 = z.reshape(shape4)
        lo4, hi4 = _row_limits(lo, hi, shape4)
        failed = _user_loops()[1](fn.dispatcher, z4, lo4, hi4, off.b0, off.hidx, off.q0, off.k0)
        if failed >= 0:
            _raise_row(fn, failed, shape4, lo4, hi4, off, score=True)


def _raise_row(fn, failed, shape4, lo4, hi4, off, score):
    _, h, q, _ = shape4
    bi, hi_, qi = failed // (h * q), (failed // q) % h, failed % q
    ks = range(off.k0 + lo4[bi, hi_, qi], off.k0 + hi4[bi, hi_, qi])
    fn.failed(off.b0 + bi, int(off.hidx[hi_]), off.q0 + qi, ks, score)


# --------------------------------------------------------------------------
# what a task hands the in-memory call


class _BlockMask(MaskStrategy):
    """A block's mask as a ready plan: intervals already shifted to the block."""

    def __init__(self, plan: MaskPlan) -> None:
        self._plan = plan
        self.structured = plan.lo is not None

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        return self._plan

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return _kept(self._plan, tuple(shape))

    @property
    def key(self) -> Any:
        return ("fastmask.dask block", self._plan.keep is not None, self._plan.lo is not None)

    def __repr__(self) -> str:
        return "fastmask.dask block mask"


def _kept(plan: MaskPlan | None, shape: tuple[int, ...]) -> np.ndarray | None:
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


def _rows_to_nd(a: Any, shape: tuple[int, ...]) -> np.ndarray:
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


class _Block(NamedTuple):
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


def _table(
    chunks: tuple[tuple[int, ...], ...],
    keep: np.ndarray | None,
    bias: np.ndarray | None,
    lo: np.ndarray | None,
    hi: np.ndarray | None,
) -> dict[tuple[int, ...], _Block]:
    """Every block's :class:`_Block`, by block index (computed on the client)."""
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
        table[idx] = _Block(loc, _slice(keep, loc), _slice(bias, loc), blo, bhi)
    return table


@dataclass(frozen=True)
class _Spec:
    """Everything the tasks of one call share (small; embedded in every task)."""

    gshape: tuple[int, ...]  # the global logits (or scores) shape, softmax axis last
    dtype: np.dtype
    scale: float
    backend: str | None
    threads: int | None
    n_keep: int  # dense keep masks that are dask arrays (first among the dask operands)
    dask_bias: bool  # the bias is a dask array (after them)
    predicate: _Shipped | None
    score: _Shipped | None

    @property
    def compute_dtype(self) -> np.dtype:
        return _COMPUTE[np.dtype(self.dtype)]

    @property
    def n_dask(self) -> int:
        return self.n_keep + int(self.dask_bias)

    def __dask_tokenize__(self) -> Any:
        return (
            "fastmask.dask._Spec", self.gshape, str(self.dtype), self.scale, self.backend,
            self.threads, self.n_keep, self.dask_bias,
            None if self.predicate is None else self.predicate.token,
            None if self.score is None else self.score.token,
        )  # fmt: skip


def _aligned(a: Any) -> Any:
    """``a``, copied if its data is not aligned to its itemsize.

    Blocks deserialised by ``dask.distributed`` can sit at any byte offset in
    a message buffer; fastmask's compiled kernels require aligned data.
    """
    if isinstance(a, np.ndarray) and not a.flags.aligned:
        return a.copy()
    return a


def _block_inputs(
    spec: _Spec, blk: _Block, xb: Any, dops: tuple
) -> tuple[Any, MaskPlan | None, np.ndarray | None, float | None]:
    """``(logits, plan, bias, scale)`` of one block, for the in-memory call.

    ``xb`` is the block of the logits (None for attention: no score functions
    there); ``dops`` the block's dask operands (dense keep masks, then bias).
    """
    shape = blk.shape
    keep = _aligned(blk.keep)
    for a in dops[: spec.n_keep]:
        a = _aligned(np.asarray(a, dtype=bool))
        keep = a if keep is None else np.logical_and(keep, a)
    bias = _aligned(dops[spec.n_keep] if spec.dask_bias else blk.bias)
    lo, hi = blk.lo, blk.hi
    scale: float | None = spec.scale
    if spec.predicate is not None or spec.score is not None:
        off = _offsets(spec.gshape, list(blk.loc))
        if spec.predicate is not None:
            grid = _predicate_block(spec.predicate, shape, lo, hi, off)
            keep = grid if keep is None else np.logical_and(keep, grid)
        if spec.score is not None:
            cdt = spec.compute_dtype
            z = np.array(xb, dtype=cdt)  # a fresh, contiguous copy
            if spec.scale != 1.0:
                z *= cdt.type(spec.scale)
            if bias is not None:
                z += np.asarray(bias).astype(cdt, copy=False)
            _score_block(spec.score, z, lo, hi, off)
            xb, bias, scale = z, None, None
    plan = None if keep is None and lo is None else MaskPlan(keep=keep, lo=lo, hi=hi)
    return _aligned(xb), plan, bias, scale


def _row_stats(
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
    kept = _kept(plan, z.shape)
    out = np.empty((*z.shape[:-1], 2), np.float64)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        bad = np.isnan(z) | (z == np.inf)
        if kept is not None:
            bad &= kept
            z = np.where(kept, z, -np.inf)
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


def _chunk_weights(m: np.ndarray, s: np.ndarray) -> np.ndarray:
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


# --------------------------------------------------------------------------
# the masked-softmax tasks


def _softmax_task(xb, blk: _Block, *dops, spec: _Spec):
    """One block of a masked softmax whose rows lie whole in the block."""
    with _thread_scope(task_threads(spec.threads)):
        x_in, plan, bias, scale = _block_inputs(spec, blk, xb, dops)
        mask = None if plan is None else _BlockMask(plan)
        y = _api.masked_softmax(x_in, mask, bias=bias, scale=scale, backend=spec.backend)
    return y.astype(spec.dtype, copy=False)


def _stats_task(xb, blk: _Block, *dops, spec: _Spec):
    """Pass one of split rows: per row of the block, ``(m, s)`` over its kept logits."""
    x_in, plan, bias, scale = _block_inputs(spec, blk, xb, dops)
    return _row_stats(x_in, plan, bias, scale, spec.compute_dtype)


def _weights_task(st: np.ndarray) -> np.ndarray:
    """Interleaved ``(m_0, s_0, m_1, s_1, ...)`` per row -> the chunk weights ``w_c``."""
    return _chunk_weights(st[..., 0::2], st[..., 1::2])


def _normalise_task(xb, blk: _Block, *dops, spec: _Spec):
    """Pass two of split rows: the block's own softmax times its chunk's weight."""
    wb = dops[-1]
    with _thread_scope(task_threads(spec.threads)):
        x_in, plan, bias, scale = _block_inputs(spec, blk, xb, dops[:-1])
        cdt = spec.compute_dtype
        if np.asarray(x_in).dtype != cdt:  # float16: one rounding, at the end
            x_in = np.asarray(x_in).astype(cdt)
        mask = None if plan is None else _BlockMask(plan)
        y = _api.masked_softmax(x_in, mask, bias=bias, scale=scale, backend=spec.backend)
    y *= wb.astype(y.dtype)
    return y.astype(spec.dtype, copy=False)


# --------------------------------------------------------------------------
# building the graphs


def _as_dask(a: Any, what: str) -> da.Array:
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


def _check_float_dtype(dt: np.dtype, what: str, hint: str) -> None:
    if np.dtype(dt) not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float16, float32 or float64; got {dt}. {hint}")


def _pad(a: Any, nd: int) -> Any:
    extra = nd - a.ndim
    if extra <= 0:
        return a
    return a[(None,) * extra] if isinstance(a, da.Array) else np.reshape(a, (1,) * extra + a.shape)


def _fit(a: Any, shape: tuple, what: str, target: str) -> Any:
    """``a`` with ``len(shape)`` axes, checked to broadcast to ``shape`` (no copy)."""
    nd = len(shape)
    if a.ndim > nd:
        raise ValueError(f"{what} has {a.ndim} dimensions, more than {target}'s {nd}")
    a = _pad(a, nd)
    for d, s in zip(a.shape, shape, strict=True):
        if d not in (1, s):
            raise ValueError(
                f"{what} of shape {tuple(a.shape)} does not broadcast to {target}'s shape {shape}"
            )
    return a


def _align(a: da.Array, shape: tuple, chunks: tuple, what: str, target: str) -> da.Array:
    """A dask operand with the target's chunks (size-1 broadcast axes: one chunk)."""
    a = _fit(a, shape, what, target)
    want = tuple(c if d == s else (1,) for d, s, c in zip(a.shape, shape, chunks, strict=True))
    return a if a.chunks == want else a.rechunk(want)


def _split_mask(mask: Any) -> tuple[MaskStrategy | None, list[Any]]:
    """``(strategy evaluated on the client, dense keep arrays read per block)``."""
    if mask is None:
        return None, []
    if isinstance(mask, LazyDense):
        return None, [mask.array]
    if isinstance(mask, AllOf):
        lazy = [p.array for p in mask.parts if isinstance(p, LazyDense)]
        rest = [p for p in mask.parts if not isinstance(p, LazyDense)]
        if not lazy:
            return mask, []
        strategy = None if not rest else rest[0] if len(rest) == 1 else AllOf(tuple(rest))
        return strategy, lazy
    if isinstance(mask, MaskStrategy):
        return mask, []
    if isinstance(mask, da.Array):
        if mask.dtype != np.bool_:
            raise mask_dtype_error(mask.dtype)
        return None, [mask]
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise mask_dtype_error(m.dtype)
    return None, [m]


@dataclass
class _Prepared:
    """A call's mask and bias, split into dask operands and per-block constants."""

    dask_ops: list[da.Array]
    n_keep: int
    dask_bias: bool
    keep: np.ndarray | None  # the NumPy dense masks, ANDed (broadcast shape)
    bias: np.ndarray | None
    lo: np.ndarray | None  # rows + (1,) intervals
    hi: np.ndarray | None
    predicate: _Shipped | None
    score: _Shipped | None

    def table(self, chunks: tuple) -> dict[tuple[int, ...], _Block]:
        return _table(chunks, self.keep, self.bias, self.lo, self.hi)

    def spec(self, gshape, dtype, scale, backend, threads) -> _Spec:
        return _Spec(
            gshape, np.dtype(dtype), scale, backend, threads, self.n_keep, self.dask_bias,
            self.predicate, self.score,
        )  # fmt: skip


def _prepare(
    strategy: MaskStrategy | None,
    dense: list[Any],
    bias: Any,
    gshape: tuple[int, ...],
    chunks: tuple,
    target: str,
) -> _Prepared:
    """Evaluate the strategy on the global shape and sort the operands (on the client)."""
    plan = strategy.plan(gshape) if strategy is not None else None
    keep_arrays = list(dense)
    if plan is not None and plan.keep is not None:
        keep_arrays.append(plan.keep)
    dask_ops: list[da.Array] = []
    np_keep = None
    for a in keep_arrays:
        if isinstance(a, da.Array):
            dask_ops.append(_align(a, gshape, chunks, "mask", target))
        else:
            a = _fit(np.asarray(a, dtype=bool), gshape, "mask", target)
            np_keep = a if np_keep is None else np.logical_and(np_keep, a)
    n_keep = len(dask_ops)
    np_bias = None
    if isinstance(bias, da.Array):
        dask_ops.append(_align(bias, gshape, chunks, "bias", target))
    elif bias is not None:
        np_bias = _fit(bias, gshape, "bias", target)
    lo = hi = None
    if plan is not None and plan.lo is not None:
        lo, hi = _rows_to_nd(plan.lo, gshape), _rows_to_nd(plan.hi, gshape)
    return _Prepared(
        dask_ops, n_keep, isinstance(bias, da.Array), np_keep, np_bias, lo, hi,
        None if plan is None or plan.predicate is None else _Shipped(plan.predicate),
        None if plan is None or plan.score is None else _Shipped(plan.score),
    )  # fmt: skip


def _prepare_bias(bias: Any) -> Any:
    if bias is None:
        return None
    b = bias if isinstance(bias, da.Array) else np.asarray(bias)
    _check_float_dtype(
        b.dtype, "bias", "Pass an additive float mask (e.g. -inf or -1e9 at masked positions)."
    )
    return b


def _move_last(a: Any, ax: int, nd: int, what: str) -> Any:
    if a.ndim > nd:
        raise ValueError(f"{what} has {a.ndim} dimensions, more than x's {nd}")
    a = _pad(a, nd)
    return da.moveaxis(a, ax, -1) if isinstance(a, da.Array) else np.moveaxis(a, ax, -1)


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
        by a two-pass reduction (see the module docs).
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
    xd = _as_dask(x, "x")
    _check_float_dtype(xd.dtype, "x (the logits)", "Convert first, e.g. x.astype(numpy.float32).")
    nd = xd.ndim
    ax = softmax_axis(axis, nd)
    s = _scale(scale)
    threads = _check_threads(threads)
    strategy, dense = _split_mask(mask)
    if strategy is not None and strategy.structured and ax != nd - 1:
        raise structured_axis_error(strategy, axis)
    bias = _prepare_bias(bias)
    if ax != nd - 1:
        xd = da.moveaxis(xd, ax, -1)
        dense = [_move_last(a, ax, nd, "mask") for a in dense]
        bias = None if bias is None else _move_last(bias, ax, nd, "bias")

    gshape = tuple(int(d) for d in xd.shape)
    prep = _prepare(strategy, dense, bias, gshape, xd.chunks, "x")
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
            _stats_task, ind, *common, spec=spec, dtype=np.float64,
            meta=np.empty((0,) * nd, np.float64), adjust_chunks={nd - 1: 2},
            name=f"fastmask-softmax-stats-{token}", **kw,
        )  # fmt: skip
        nc = len(xd.chunks[-1])
        stats = stats.rechunk({nd - 1: -1})  # all of a row's chunk statistics together
        w = da.map_blocks(
            _weights_task, stats, dtype=np.float64, chunks=(*stats.chunks[:-1], (nc,)),
            meta=np.empty((0,) * nd, np.float64), name=f"fastmask-softmax-weights-{token}",
        )  # fmt: skip
        w = w.rechunk({nd - 1: 1})  # one weight per row and chunk, aligned with x's chunks
        y = da.blockwise(
            _normalise_task, ind, *common, w, ind, spec=spec, dtype=xd.dtype, meta=meta,
            name=f"fastmask-softmax-normalise-{token}", **kw,
        )  # fmt: skip
    if ax != nd - 1:
        y = da.moveaxis(y, -1, ax)
    return y


# --------------------------------------------------------------------------
# attention


@dataclass(frozen=True)
class _AttentionSpec:
    mask: _Spec  # on the scores: gshape = batch + (Lq, Lk)
    return_weights: bool
    group: int  # query heads per kv head (1: none, or broadcast)
    head_axis: int | None  # the batch axis of heads (grouped-query attention only)
    dv: int

    def __dask_tokenize__(self) -> Any:
        return (
            "fastmask.dask._AttentionSpec", self.mask.__dask_tokenize__(), self.return_weights,
            self.group, self.head_axis, self.dv,
        )  # fmt: skip


def _kv_heads(kb, vb, blk: _Block, spec: _AttentionSpec, expand: bool = False):
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


def _attention_task(qb, kb, vb, blk: _Block, *dops, spec: _AttentionSpec):
    """One block of queries (batch x heads x queries) against all keys."""
    ms = spec.mask
    qb, kb, vb = _aligned(qb), _aligned(kb), _aligned(vb)
    kb, vb = _kv_heads(kb, vb, blk, spec)
    with _thread_scope(task_threads(ms.threads)):
        _, plan, bias, _ = _block_inputs(ms, blk, None, dops)
        mask = None if plan is None else _BlockMask(plan)
        return _in_memory_attention(
            qb, kb, vb, mask, bias=bias, scale=ms.scale,
            return_weights=spec.return_weights, backend=ms.backend,
        )  # fmt: skip


def _attention_part_task(qb, kb, vb, blk: _Block, *dops, spec: _AttentionSpec):
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
    with _thread_scope(task_threads(ms.threads)):
        _, plan, bias, _ = _block_inputs(ms, blk, None, dops)
        mask = None if plan is None else _BlockMask(plan)
        p = _api.masked_softmax(z, mask, bias=bias, scale=ms.scale, backend=ms.backend)
    stats = _row_stats(z, plan, bias, ms.scale, cdt)
    o = np.matmul(p, v)
    o = np.broadcast_to(o, (*shape[:-1], spec.dv))
    packed = np.concatenate([o.astype(np.float64), stats], axis=-1)[..., None, :]
    if spec.return_weights:
        return packed, p[..., None]  # the trailing axis stands in for the packed one
    return packed


def _attention_merge_task(pb, *, dv: int, out_dtype: np.dtype):
    """All key chunks' partial outputs of a block of rows -> the output rows."""
    w = _chunk_weights(pb[..., dv], pb[..., dv + 1])  # rows + (chunks,)
    with np.errstate(invalid="ignore"):
        parts = pb[..., :dv] * w[..., None]
    parts[w == 0] = 0.0  # a chunk that keeps nothing of a row adds nothing, whatever its v
    out = parts.sum(axis=-2)  # NaN rows stay NaN: their weights are NaN
    return out.astype(out_dtype)


def _attention_weights_task(stats):
    """Packed statistics ``rows + (chunks, 2)`` -> chunk weights ``rows + (chunks,)``."""
    return _chunk_weights(stats[..., 0], stats[..., 1])


def _scale_weights_task(pb, wb, *, out_dtype: np.dtype):
    return (pb * wb.astype(pb.dtype)).astype(out_dtype, copy=False)


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
    qd, kd, vd = _as_dask(q, "q"), _as_dask(k, "k"), _as_dask(v, "v")
    hint = "Convert first, e.g. a.astype(numpy.float32)."
    for a, name in ((qd, "q"), (kd, "k"), (vd, "v")):
        _check_float_dtype(a.dtype, name, hint)
    if not qd.dtype == kd.dtype == vd.dtype:
        raise TypeError(
            f"q, k and v must have the same dtype; got {qd.dtype}, {kd.dtype} and {vd.dtype}. "
            "Convert them first, e.g. k.astype(q.dtype)."
        )
    if not isinstance(return_weights, (bool, np.bool_)):
        raise TypeError(f"return_weights must be a bool; got {return_weights!r}")
    batch, hq, hk = _attention_shapes(qd, kd, vd)
    group = hq // hk
    batch = tuple(int(d) for d in batch)
    nb = len(batch)
    lq, d = (int(n) for n in qd.shape[-2:])
    lk, dv = (int(n) for n in vd.shape[-2:])
    if scale is None:
        s = 1.0 / math.sqrt(d) if d > 0 else 1.0
    else:
        s = _scale(scale)
    threads = _check_threads(threads)
    strategy, dense = _split_mask(mask)
    scores = (*batch, lq, lk)
    if strategy is not None and getattr(strategy, "compiled", False):
        if strategy.plan(scores).score is not None:
            raise ValueError(
                "fastmask.dask.attention does not take score functions (masks.score); "
                "they are masked_softmax only"
            )
    bias = _prepare_bias(bias)
    head_axis = nb - 1 if group > 1 else None

    qd, kd, vd = _pad(qd, nb + 2), _pad(kd, nb + 2), _pad(vd, nb + 2)
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
    prep = _prepare(strategy, dense, bias, scores, score_chunks, "the scores")
    mspec = prep.spec(scores, qd.dtype, s, backend, threads)
    spec = _AttentionSpec(mspec, bool(return_weights), group, head_axis, dv)
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
                _attention_task, out_ind, *args, spec=spec, dtype=dtype, meta=out_meta,
                new_axes=new_axes, name=f"fastmask-attention-{token}", **kw,
            )  # fmt: skip
        pair = da.blockwise(
            _attention_task, out_ind, *args, spec=spec, dtype=object,
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
            _attention_part_task, part_ind, *args, dtype=object,
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
            _attention_part_task, part_ind, *args, dtype=np.float64, meta=f64_meta,
            name=f"fastmask-attention-parts-{token}", **part_kw,
        )  # fmt: skip
    packed = packed.rechunk({kc: -1})  # every key chunk of a row together
    out = da.map_blocks(
        _attention_merge_task, packed, dv=dv, out_dtype=dtype, dtype=dtype, drop_axis=kc,
        chunks=(*out_chunks, qd.chunks[-2], (dv,)), meta=np.empty((0,) * (nb + 2), dtype),
        name=f"fastmask-attention-merge-{token}",
    )  # fmt: skip
    if not return_weights:
        return out
    w = da.map_blocks(
        _attention_weights_task, packed[..., dv:], dtype=np.float64, drop_axis=nd_p - 1,
        meta=np.empty((0,) * (nb + 2), np.float64), name=f"fastmask-attention-w-{token}",
    )  # fmt: skip
    w = w.rechunk({kc: 1})
    weights = da.map_blocks(
        _scale_weights_task, chunk_p, w, out_dtype=dtype, dtype=dtype,
        meta=np.empty((0,) * (nb + 2), dtype), name=f"fastmask-attention-scaled-weights-{token}",
    )  # fmt: skip
    return out, weights
