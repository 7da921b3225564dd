"""Interval strategies beyond padding/causal: ``sliding_window``, ``prefix_lm``, ``segments``."""

from __future__ import annotations

import numpy as np

from .base import MaskPlan, MaskStrategy, canonical_dims
from .structured import _as_int, _frozen

__all__ = ["PrefixLM", "Segments", "SlidingWindow", "prefix_lm", "segments", "sliding_window"]


class SlidingWindow(MaskStrategy):
    """Local attention: a band of keys around (or up to) each query's diagonal."""

    immutable = True

    def __init__(self, size: object, causal: bool = True, align: str = "top-left") -> None:
        self.size = _as_int(size, "sliding_window size")
        if self.size < 1:
            raise ValueError(f"sliding_window size must be >= 1; got {self.size}")
        if align not in ("top-left", "bottom-right"):
            raise ValueError(f"align must be 'top-left' or 'bottom-right'; got {align!r}")
        self.causal = bool(causal)
        self.align = align

    def _limits(self, q: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        diag = np.arange(q, dtype=np.int64) + (n - q if self.align == "bottom-right" else 0)
        size = min(self.size, n + q + 1)  # beyond that the band covers every row anyway
        lo = diag - size + 1
        hi = diag + 1 if self.causal else diag + size
        return lo, hi

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        _, _, q, n = canonical_dims(shape)
        lo, hi = self._limits(q, n)
        return MaskPlan(lo=lo.reshape(1, 1, q), hi=hi.reshape(1, 1, q))

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        b, h, q, n = canonical_dims(shape)
        i = np.arange(q)[:, None] + (n - q if self.align == "bottom-right" else 0)
        j = np.arange(n)[None, :]
        band = (j > i - self.size) & ((j <= i) if self.causal else (j < i + self.size))
        return np.broadcast_to(band, (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.sliding_window({self.size}, causal={self.causal}, align={self.align!r})"


class PrefixLM(MaskStrategy):
    """Bidirectional attention over a prefix, causal after it."""

    immutable = True

    def __init__(self, prefix_len: object) -> None:
        a = np.asarray(prefix_len)
        if a.dtype.kind not in "iu":
            raise TypeError(f"prefix_lm lengths must be integers; got dtype {a.dtype}")
        if a.ndim > 1:
            raise ValueError(f"prefix_lm lengths must be a scalar or 1-D; got shape {a.shape}")
        if a.size and a.min() < 0:
            raise ValueError(f"prefix_lm lengths must be >= 0; got {a.min()}")
        self.prefix = _frozen(a, "prefix_lm lengths", clip=True)  # past the row: all

    def _prefix(self, b: int) -> np.ndarray:
        if self.prefix.ndim == 1 and self.prefix.shape[0] != b:
            raise ValueError(
                f"prefix_lm() got {self.prefix.shape[0]} lengths but the logits have a batch of {b}"
            )
        return np.broadcast_to(self.prefix.reshape(-1), (b,))

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        b, _, q, _ = canonical_dims(shape)
        prefix = self._prefix(b).reshape(b, 1, 1)
        hi = np.maximum(prefix, np.arange(1, q + 1, dtype=np.int64).reshape(1, 1, q))
        return MaskPlan(lo=np.zeros((1, 1, 1), np.int64), hi=hi)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        b, h, q, n = canonical_dims(shape)
        i = np.arange(q)[None, :, None]
        j = np.arange(n)[None, None, :]
        keep = (j <= i) | (j < self._prefix(b)[:, None, None])  # (b, q, n)
        return np.broadcast_to(keep[:, None], (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.prefix_lm({self.prefix.tolist()})"


def _ids(a: object, what: str) -> np.ndarray:
    ids = np.asarray(a)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"segments {what} must be integers; got dtype {ids.dtype}")
    if ids.ndim not in (1, 2):
        raise ValueError(f"segments {what} must be 1-D (L,) or 2-D (B, L); got shape {ids.shape}")
    return _frozen(
        ids.reshape(-1, ids.shape[-1]), f"segments {what}",
        hint="; renumber them, e.g. numpy.unique(ids, return_inverse=True)[1]",
    )  # fmt: skip


class Segments(MaskStrategy):
    """Block-diagonal attention: a query sees only keys of its own segment (packed documents)."""

    immutable = True

    def __init__(self, q_ids: object, k_ids: object = None) -> None:
        self.q_ids = _ids(q_ids, "q_ids")
        self.k_ids = self.q_ids if k_ids is None else _ids(k_ids, "k_ids")

    def _check(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        b, _, q, n = canonical_dims(shape)
        for ids, length, what in ((self.q_ids, q, "q_ids"), (self.k_ids, n, "k_ids")):
            if ids.shape[1] != length:
                raise ValueError(
                    f"segments {what} has length {ids.shape[1]}, but the logits {shape} have "
                    f"{'Lq' if what == 'q_ids' else 'Lk'} = {length}"
                )
            if ids.shape[0] not in (1, b):
                raise ValueError(
                    f"segments {what} has {ids.shape[0]} rows; the logits have a batch of {b}"
                )
        return np.broadcast_to(self.q_ids, (b, q)), np.broadcast_to(self.k_ids, (b, n))

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        q_ids, k_ids = self._check(shape)
        b, q = q_ids.shape
        lo = np.zeros((b, 1, q), np.int64)
        hi = np.zeros((b, 1, q), np.int64)
        dense = None
        for i in range(b):
            k = k_ids[i]
            starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
            run_ids = k[starts]
            if np.unique(run_ids).size != run_ids.size:  # an id in several runs: not an interval
                dense = q_ids[:, None, :, None] == k_ids[:, None, None, :]
                break
            ends = np.r_[starts[1:], k.size]
            order = np.argsort(run_ids)
            pos = np.searchsorted(run_ids[order], q_ids[i])
            pos = np.minimum(pos, run_ids.size - 1)
            found = run_ids[order][pos] == q_ids[i]
            lo[i, 0] = np.where(found, starts[order][pos], 0)
            hi[i, 0] = np.where(found, ends[order][pos], 0)
        if dense is not None:
            # Materialised at (B, 1, Lq, Lk), shared by every head.
            return MaskPlan(keep=dense.reshape(_keep_shape(shape, dense.shape)))
        return MaskPlan(lo=lo, hi=hi)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        q_ids, k_ids = self._check(shape)
        keep = q_ids[:, :, None] == k_ids[:, None, :]  # (b, q, n)
        b, h, q, n = canonical_dims(shape)
        return np.broadcast_to(keep[:, None], (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.segments(<{self.q_ids.shape} ids>)"


def _keep_shape(shape: tuple[int, ...], dense_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(B, 1, Q, N) laid out against logits of ``shape`` (any rank)."""
    b, _, q, n = dense_shape
    nd = len(shape)
    if nd >= 3:
        return (b,) + (1,) * (nd - 3) + (q, n)
    return (q, n)[-nd:] if nd else ()


def sliding_window(size: int, causal: bool = True, *, align: str = "top-left") -> SlidingWindow:
    """Local attention over a window of keys.

    Parameters
    ----------
    size : int
        With ``causal=True`` query ``i`` keeps keys ``i - size < j <= i`` (``size``
        keys, itself included); with ``causal=False`` the symmetric band
        ``|i - j| < size``.
    causal : bool
        Causal window (default) or symmetric band.
    align : {"top-left", "bottom-right"}
        As for :func:`causal`: ``"bottom-right"`` puts the diagonal at
        ``i + Lk - Lq`` (KV-cache decoding).
    """
    return SlidingWindow(size, causal, align)


def prefix_lm(prefix_len: object) -> PrefixLM:
    """Prefix-LM mask: every query sees the prefix, and causally after it.

    Parameters
    ----------
    prefix_len : int or array_like of int, shape (B,)
        Prefix length, per batch entry or for all; key ``j`` is kept for query
        ``i`` when ``j < prefix_len`` or ``j <= i``.
    """
    return PrefixLM(prefix_len)


def segments(q_ids: object, k_ids: object = None) -> Segments:
    """Block-diagonal mask for packed sequences: attend within your own segment.

    Parameters
    ----------
    q_ids : array_like of int, shape (Lq,) or (B, Lq)
        Segment (document) id of each query.
    k_ids : array_like of int, shape (Lk,) or (B, Lk), optional
        Segment id of each key; defaults to ``q_ids`` (self-attention).

    Notes
    -----
    When each id occupies one contiguous run of keys (packed documents), the mask
    is evaluated as one interval per row. Otherwise it is materialised once at
    ``(B, 1, Lq, Lk)`` and shared by all heads. Combine with :func:`causal` for
    packed causal documents.
    """
    return Segments(q_ids, k_ids)
