"""User predicates and score functions evaluated per block, at global indices.

:func:`fastmask.masks.predicate` and :func:`fastmask.masks.score` functions see
global indices: each task evaluates the function for its block's global
``(b, h, q_idx, k_idx)`` (inside the rows' kept intervals) with a Numba loop
compiled once per worker process, and passes the result to the kernel as the
block's keep mask (predicates: a boolean array the size of the block, made on
the worker) or as rewritten logits (score functions). The function itself
travels as a Numba dispatcher (its Python code, a few kB) and is compiled once
per process. (The kernels' fused predicate path takes a head offset but no
batch/query/key offsets, so blocks cannot use it with global indices.)
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..masks.base import canonical_dims
from ..masks.custom import UserFunctionError

__all__ = ["Offsets", "Shipped", "offsets", "predicate_block", "score_block"]


_PROCESS_TOKEN = uuid.uuid4().hex
_shipped_lock = threading.Lock()
_shipped: dict[str, Any] = {}  # token -> dispatcher, one per process
_MAX_SHIPPED = 64
_loops: tuple | None = None


class Shipped:
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
                raise UserFunctionError(
                    f"{self.kind} {self.name!r} raised {type(exc).__name__} at "
                    f"({where}, k_idx={k}): {exc}"
                ) from exc
        raise UserFunctionError(
            f"{self.kind} {self.name!r} raised an exception in its compiled code on the row "
            f"({where})"
        )

    def __dask_tokenize__(self) -> Any:
        return ("fastmask.dask.Shipped", self.token)


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
class Offsets:
    """Where a block sits in the global canonical ``(B, H, Q, N)`` grid."""

    b0: int
    hidx: np.ndarray  # global flat head index of each of the block's heads
    q0: int
    k0: int


def offsets(gshape: tuple[int, ...], loc: list[tuple[int, int]]) -> Offsets:
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
    return Offsets(b0, hidx, q0, k0)


def _row_limits(lo: np.ndarray | None, hi: np.ndarray | None, shape4: tuple) -> tuple:
    b, h, q, n = shape4
    if lo is None:
        return np.zeros((b, h, q), np.int64), np.full((b, h, q), n, np.int64)
    lo4 = np.ascontiguousarray(np.broadcast_to(np.clip(lo, 0, n), (b, h, q)), dtype=np.int64)
    hi4 = np.ascontiguousarray(np.broadcast_to(np.clip(hi, 0, n), (b, h, q)), dtype=np.int64)
    return lo4, hi4


def predicate_block(fn: Shipped, shape: tuple, lo: Any, hi: Any, off: Offsets) -> np.ndarray:
    """The predicate's keep mask of a block of ``shape`` at ``off`` (False outside ``[lo, hi)``)."""
    shape4 = canonical_dims(shape)
    keep = np.zeros(shape4, np.bool_)
    if keep.size:
        lo4, hi4 = _row_limits(lo, hi, shape4)
        failed = _user_loops()[0](fn.dispatcher, keep, lo4, hi4, off.b0, off.hidx, off.q0, off.k0)
        if failed >= 0:
            _raise_row(fn, failed, shape4, lo4, hi4, off, score=False)
    return keep.reshape(shape)


def score_block(fn: Shipped, z: np.ndarray, lo: Any, hi: Any, off: Offsets) -> None:
    """Apply the score function to the block's logits ``z`` in place, inside ``[lo, hi)``."""
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
