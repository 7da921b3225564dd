"""Structured masks evaluated per row as kept intervals: ``padding`` and ``causal``."""

from __future__ import annotations

import operator

import numpy as np

from .base import MaskPlan, MaskStrategy, canonical_dims

__all__ = ["Causal", "Padding", "causal", "padding"]


def _as_int(value: object, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer; got {value!r}") from None


_INT64_MAX = np.iinfo(np.int64).max


def _frozen(a: np.ndarray, what: str, clip: bool = False, hint: str = "") -> np.ndarray:
    """A read-only int64 copy: strategies never change after construction.

    Unsigned values beyond int64 would wrap negative: ``clip`` (lengths for which any
    value past the row means the same) clips them, otherwise they are refused.
    """
    if a.dtype.kind == "u" and a.size and a.max() > _INT64_MAX:
        if not clip:
            raise ValueError(
                f"{what} above {_INT64_MAX} (2**63 - 1) do not fit int64; got {a.max()}{hint}"
            )
        a = np.minimum(a, np.uint64(_INT64_MAX))
    out = a.astype(np.int64)
    out.flags.writeable = False
    return out


class Padding(MaskStrategy):
    """Per-batch key lengths: keys past each sequence's length are padding."""

    immutable = True

    def __init__(self, lengths: object, side: str = "right") -> None:
        if side not in ("right", "left"):
            raise ValueError(f"padding side must be 'right' or 'left'; got {side!r}")
        a = np.asarray(lengths)
        if a.dtype.kind not in "iu":
            raise TypeError(
                f"padding lengths must be integers (one per batch entry); got dtype {a.dtype}"
            )
        if a.ndim > 1:
            raise ValueError(f"padding lengths must be a scalar or 1-D; got shape {a.shape}")
        if a.size and a.min() < 0:
            raise ValueError(f"padding lengths must be >= 0; got {a.min()}")
        self.lengths = _frozen(a, "padding lengths")
        self.side = side

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        b, _, _, n = canonical_dims(shape)
        ln = self.lengths
        if ln.ndim == 1 and ln.shape[0] != b:
            raise ValueError(
                f"padding() got {ln.shape[0]} lengths but the logits {shape} have a batch of "
                f"{b} (the first axis when ndim >= 3)"
            )
        if ln.size and ln.max() > n:
            raise ValueError(f"padding lengths must be <= Lk = {n}; got {ln.max()}")
        ln = ln.reshape(-1, 1, 1)
        if self.side == "right":
            return MaskPlan(lo=np.zeros((1, 1, 1), np.int64), hi=ln)
        return MaskPlan(lo=n - ln, hi=np.full((1, 1, 1), n, np.int64))

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        b, h, q, n = canonical_dims(shape)
        k = np.arange(n)
        ln = np.broadcast_to(self.lengths.reshape(-1), (b,))[:, None]
        rows = k < ln if self.side == "right" else k >= n - ln  # (b, n)
        return np.broadcast_to(rows[:, None, None, :], (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.padding({self.lengths.tolist()}, side={self.side!r})"


class Causal(MaskStrategy):
    """Key ``j`` is kept for query ``i`` when ``j <= i + offset`` (+ ``Lk - Lq`` bottom-right)."""

    immutable = True

    def __init__(self, offset: object = 0, align: str = "top-left") -> None:
        if align not in ("top-left", "bottom-right"):
            raise ValueError(f"causal align must be 'top-left' or 'bottom-right'; got {align!r}")
        self.offset = _as_int(offset, "causal offset")
        self.align = align

    def _shift(self, q: int, n: int) -> int:
        shift = self.offset + (n - q if self.align == "bottom-right" else 0)
        # Beyond the row the mask keeps all or nothing; clipping keeps int64 safe.
        return max(-(q + 1), min(shift, n + 1))

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        _, _, q, n = canonical_dims(shape)
        hi = np.arange(q, dtype=np.int64).reshape(1, 1, q) + (self._shift(q, n) + 1)
        return MaskPlan(lo=np.zeros((1, 1, 1), np.int64), hi=hi)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        b, h, q, n = canonical_dims(shape)
        i = np.arange(q)[:, None]
        j = np.arange(n)[None, :]
        return np.broadcast_to(j <= i + self._shift(q, n), (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.causal(offset={self.offset}, align={self.align!r})"


def padding(lengths: object, side: str = "right") -> Padding:
    """Mask the padded tail (or head) of each sequence's keys.

    Parameters
    ----------
    lengths : int or array_like of int, shape (B,)
        Valid key count per batch entry (``B`` is the logits' first axis when
        ``ndim >= 3``, else 1); a scalar applies to every entry.
    side : {"right", "left"}
        ``"right"`` keeps keys ``[0, length)``; ``"left"`` keeps the last
        ``length`` keys (left-padded decoder batches).
    """
    return Padding(lengths, side)


def causal(offset: int = 0, *, align: str = "top-left") -> Causal:
    """Causal (look-ahead) mask: query ``i`` attends to keys ``j <= i + offset``.

    Parameters
    ----------
    offset : int
        Extra keys visible ahead of the diagonal (negative hides the diagonal too).
    align : {"top-left", "bottom-right"}
        ``"bottom-right"`` aligns the diagonal to the last key when ``Lq != Lk``
        (KV-cache decoding; PyTorch's ``causal_lower_right``): ``j <= i + offset + Lk - Lq``.
    """
    return Causal(offset, align)
