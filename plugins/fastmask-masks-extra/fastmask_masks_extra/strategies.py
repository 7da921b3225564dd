"""The strategies of this plugin: ``alibi``, ``strided`` and ``global_local``.

Each is a :class:`fastmask.masks.MaskStrategy` built on fastmask's user
functions (``fastmask.masks.predicate`` / ``fastmask.masks.score``), so the
``numba`` backend runs it fused into its kernel. Each has ``_dense``, an
independent NumPy definition that ``.to_dense()`` returns and the tests
compare the fused kernel against. Creating a strategy compiles nothing; the
Numba compilation happens on the first call that uses it (once per distinct
parameter set, shared by equal strategies).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import numpy as np

from fastmask import masks
from fastmask.masks import MaskPlan, MaskStrategy
from fastmask.masks.base import canonical_dims

__all__ = [
    "ALiBi",
    "GlobalLocal",
    "Strided",
    "alibi",
    "alibi_slopes",
    "global_local",
    "strided",
]


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, not a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer; got {value!r}") from None
    if v < 1:
        raise ValueError(f"{what} must be >= 1; got {v}")
    return v


# --------------------------------------------------------------------------
# ALiBi


def alibi_slopes(n_heads: int) -> np.ndarray:
    """The per-head slopes of the ALiBi paper (Press, Smith & Lewis, ICLR 2022).

    For ``n`` heads, ``n`` a power of two, the geometric sequence
    ``2**(-8/n), 2**(-16/n), ..., 2**-8``. Otherwise the sequence for the
    largest power of two ``m < n``, followed by every other slope of the
    sequence for ``2m`` (the odd-numbered ones) until there are ``n``.
    """
    n = _positive_int(n_heads, "the number of heads")

    def geometric(count: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / count) for i in range(count)]

    if n & (n - 1) == 0:
        return np.array(geometric(n))
    m = 2 ** math.floor(math.log2(n))
    return np.array(geometric(m) + geometric(2 * m)[0::2][: n - m])


@functools.lru_cache(maxsize=64)
def _alibi_score(slopes: tuple[float, ...]) -> masks.ScoreFunction:
    table = np.array(slopes)

    def alibi_bias(score, b, h, q_idx, k_idx):
        return score + table[h] * (k_idx - q_idx)

    return masks.score(alibi_bias, name=f"alibi({len(slopes)} heads)")


class ALiBi(MaskStrategy):
    """Attention with Linear Biases: adds ``slope[h] * (k_idx - q_idx)`` to each score."""

    compiled = True

    def __init__(self, slopes: object = None) -> None:
        if slopes is None:
            self.slopes = None
        else:
            a = np.asarray(slopes, dtype=np.float64)
            if a.ndim != 1 or a.size == 0:
                raise ValueError(f"alibi slopes must be a non-empty 1-D array; got shape {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError("alibi slopes must be finite")
            self.slopes = a

    def slopes_for(self, n_heads: int) -> np.ndarray:
        """The slopes used for logits with ``n_heads`` (flat) heads."""
        if self.slopes is None:
            return alibi_slopes(n_heads)
        if self.slopes.size != n_heads:
            raise ValueError(
                f"alibi() got {self.slopes.size} slopes but the logits have {n_heads} heads "
                "(the flat index over the axes between the first and Lq)"
            )
        return self.slopes

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        _, h, _, _ = canonical_dims(shape)
        return MaskPlan(score=_alibi_score(tuple(self.slopes_for(h).tolist())))

    def bias(self, shape: tuple[int, ...]) -> np.ndarray:
        """The same bias as an array of ``shape`` (for inspection and tests)."""
        b, h, q, n = canonical_dims(shape)
        rel = np.arange(n)[None, :] - np.arange(q)[:, None]
        full = self.slopes_for(h)[:, None, None] * rel[None]
        return np.ascontiguousarray(np.broadcast_to(full, (b, h, q, n))).reshape(shape)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.ones((1,) * len(shape), bool)  # a score modifier masks nothing

    def __repr__(self) -> str:
        if self.slopes is None:
            return "masks.alibi()"
        return f"masks.alibi(<{self.slopes.size} slopes>)"


def alibi(slopes: object = None) -> ALiBi:
    """ALiBi position biases, fused into the kernel as a score function.

    Adds ``slope[h] * (k_idx - q_idx)`` to each score (after scale and bias):
    the further a key lies behind the query, the lower its score. It keeps
    every key: combine it with a mask, normally ``fastmask.masks.causal()``
    (under a causal mask the bias is ``-slope * distance`` exactly as in the
    paper, and since it is linear in ``k_idx`` its value does not depend on
    where the diagonal is aligned, so KV-cache decoding needs no change).

    Parameters
    ----------
    slopes : array_like of float, shape (H,), optional
        One slope per head, ``H`` being the flat head count of the logits
        (``(B, H, Lq, Lk)``; several middle axes count as one flat axis). By
        default, the paper's geometric slopes for ``H`` heads
        (:func:`alibi_slopes`). With 2-D or 3-D logits there is one head.
    """
    return ALiBi(slopes)


# --------------------------------------------------------------------------
# strided (Sparse Transformer)


@functools.lru_cache(maxsize=64)
def _strided_predicate(stride: int, local: int) -> masks.Predicate:
    def strided_keep(b, h, q_idx, k_idx):
        d = q_idx - k_idx
        return d >= 0 and (d < local or d % stride == 0)

    return masks.predicate(strided_keep, name=f"strided({stride}, local={local})")


class Strided(MaskStrategy):
    """Causal strided attention: the last ``local`` keys plus every ``stride``-th one before."""

    compiled = True

    def __init__(self, stride: object, local: object = None) -> None:
        self.stride = _positive_int(stride, "strided stride")
        self.local = self.stride if local is None else _positive_int(local, "strided local")

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        # the causal interval narrows each row; the predicate filters inside it
        pred = _strided_predicate(self.stride, self.local)
        return masks.causal().plan(shape) & pred.plan(shape)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        b, h, q, n = canonical_dims(shape)
        d = np.arange(q)[:, None] - np.arange(n)[None, :]
        keep = (d >= 0) & ((d < self.local) | (d % self.stride == 0))
        return np.broadcast_to(keep, (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.strided({self.stride}, local={self.local})"


def strided(stride: int, local: int | None = None) -> Strided:
    """The Sparse Transformer's strided pattern (Child et al., 2019), causal.

    Query ``i`` keeps key ``j <= i`` when ``i - j < local`` (the recent keys) or
    ``(i - j) % stride == 0`` (every ``stride``-th key before them): the union of
    the paper's two factorised heads, in one mask.

    Parameters
    ----------
    stride : int
        Distance between the strided keys (``>= 1``).
    local : int, optional
        How many recent keys (the query itself included) are all kept; default ``stride``.
    """
    return Strided(stride, local)


# --------------------------------------------------------------------------
# global + local (Longformer)


@functools.lru_cache(maxsize=64)
def _global_local_predicate(window: int, global_idx: tuple[int, ...]) -> masks.Predicate:
    table = np.zeros(max(1, max(global_idx, default=0) + 1), dtype=np.bool_)
    table[list(global_idx)] = True  # table[i]: token i is global
    size = table.size

    def global_local_keep(b, h, q_idx, k_idx):
        if abs(q_idx - k_idx) < window:
            return True
        return (q_idx < size and table[q_idx]) or (k_idx < size and table[k_idx])

    name = f"global_local({window}, <{len(global_idx)} global tokens>)"
    return masks.predicate(global_local_keep, name=name)


class GlobalLocal(MaskStrategy):
    """A local band plus global tokens that see, and are seen by, every position."""

    compiled = True

    def __init__(self, window: object, global_tokens: object) -> None:
        self.window = _positive_int(window, "global_local window")
        if isinstance(global_tokens, (bool, np.bool_)):
            raise TypeError("global_tokens must be a count or token indices, not a bool")
        g = np.asarray(global_tokens)
        if g.dtype.kind not in "iu":
            raise TypeError(
                f"global_tokens must be an int count or integer indices; got dtype {g.dtype}"
            )
        if g.ndim == 0:
            if g < 0:
                raise ValueError(f"global_tokens count must be >= 0; got {int(g)}")
            g = np.arange(int(g))
        elif g.ndim != 1:
            raise ValueError(f"global_tokens indices must be 1-D; got shape {g.shape}")
        elif g.size and g.min() < 0:
            raise ValueError(f"global_tokens indices must be >= 0; got {g.min()}")
        self.global_idx = np.unique(g).astype(np.int64)

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        canonical_dims(shape)
        idx = tuple(self.global_idx.tolist())
        return _global_local_predicate(self.window, idx).plan(shape)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        b, h, q, n = canonical_dims(shape)
        i = np.arange(q)[:, None]
        j = np.arange(n)[None, :]
        g = np.zeros(max(q, n), bool)
        g[self.global_idx[self.global_idx < g.size]] = True
        keep = (np.abs(i - j) < self.window) | g[:q][:, None] | g[:n][None, :]
        return np.broadcast_to(keep, (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.global_local({self.window}, <{self.global_idx.size} global tokens>)"


def global_local(window: int, global_tokens: Any) -> GlobalLocal:
    """Longformer-style attention: a local band plus global tokens.

    Query ``i`` keeps key ``j`` when ``|i - j| < window`` (the band of
    :func:`fastmask.masks.sliding_window` with ``causal=False``), when ``j``
    is a global token (everyone sees it) or when ``i`` is one (it sees
    everything). Not causal; combine with ``fastmask.masks.causal()`` for a
    decoder.

    Parameters
    ----------
    window : int
        Half-width of the band, itself included (``>= 1``).
    global_tokens : int or array_like of int
        A count ``n`` (tokens ``0 .. n-1``, e.g. a CLS token) or the positions
        of the global tokens; they apply to query and key positions alike.
    """
    return GlobalLocal(window, global_tokens)
