"""The mask-strategy interface and its composition.

A strategy says, for logits of shape ``(..., Lq, Lk)``, which keys each query
row keeps. It hands the kernels a :class:`MaskPlan`: per-row kept intervals
``[lo, hi)`` where it can (the kernels then loop only over kept keys), a
dense boolean array only where the user gave one, and user predicates and
score functions compiled with Numba (:mod:`fastmask.masks.custom`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["AllOf", "MaskPlan", "MaskStrategy", "canonical_dims"]


def canonical_dims(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Split ``(..., Lq, Lk)`` into ``(B, H, Q, N)``.

    ``B`` is the first axis when ``ndim >= 3``, ``H`` the product of the axes
    between it and ``Lq``, ``Q`` the query axis (1 for 1-D input), ``N`` the key axis.
    """
    nd = len(shape)
    if nd == 0:
        raise ValueError("masked softmax needs at least one axis; got a 0-d array")
    n = shape[-1]
    q = shape[-2] if nd >= 2 else 1
    b = shape[0] if nd >= 3 else 1
    h = 1
    for d in shape[1:-2]:
        h *= d
    return b, h, q, n


@dataclass(frozen=True)
class MaskPlan:
    """What the kernels need to know about a mask, without an ``Lq x Lk`` array.

    Attributes
    ----------
    keep : ndarray of bool or None
        Dense keep-mask broadcastable to the logits (user-given dense masks only).
    lo, hi : ndarray of int64 or None
        Kept key interval ``[lo, hi)`` per row, broadcastable to ``(B, H, Q)``.
    predicate : fastmask.masks.custom.Predicate or None
        A user predicate ``f(b, h, q_idx, k_idx) -> bool`` (keys it drops are
        masked, inside the interval).
    score : fastmask.masks.custom.ScoreFunction or None
        A user score modifier ``f(score, b, h, q_idx, k_idx) -> score``,
        applied after scale and bias, before masking.

    Only backends that can run compiled user code serve plans with a
    ``predicate`` or ``score`` (see :attr:`MaskStrategy.compiled`).
    """

    keep: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    predicate: Any = None
    score: Any = None

    def __and__(self, other: MaskPlan) -> MaskPlan:
        if self.keep is None:
            keep = other.keep
        elif other.keep is None:
            keep = self.keep
        else:
            # Two dense masks: materialised at their own broadcast shape, not the logits'.
            keep = np.logical_and(self.keep, other.keep)
        if self.lo is None:
            lo, hi = other.lo, other.hi
        elif other.lo is None:
            lo, hi = self.lo, self.hi
        else:
            lo, hi = np.maximum(self.lo, other.lo), np.minimum(self.hi, other.hi)
        predicate, score = self.predicate, self.score
        if other.predicate is not None or other.score is not None:
            from .custom import all_predicates, compose_scores

            # one compiled AND of the predicates; the score functions left to right
            predicate = all_predicates(predicate, other.predicate)
            score = compose_scores(score, other.score)
        return MaskPlan(keep, lo, hi, predicate, score)


class MaskStrategy:
    """Base class of mask strategies: which keys each query row keeps.

    Subclasses implement :meth:`plan` (what the kernels use) and :meth:`_dense`
    (an independent, obviously-correct definition used by :meth:`to_dense` and by
    the tests), and set ``structured`` to False when they work along any axis.
    """

    #: True when the strategy is defined on ``(..., Lq, Lk)`` with the softmax axis last.
    structured: bool = True
    #: True when :meth:`plan` may carry a user predicate or score function
    #: (compiled with Numba): only backends that run those can serve it.
    #: Strategies built on :func:`fastmask.masks.predicate` / ``score`` set it.
    compiled: bool = False
    #: True when the strategy's data never changes after construction (the
    #: built-in structured strategies): fastmask then reuses its plan for repeated
    #: calls on the same shape. Leave False if your strategy's fields may change.
    immutable: bool = False

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        """Return the :class:`MaskPlan` for logits of ``shape`` (validated)."""
        raise NotImplementedError

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        # The plan fastmask remembers for the last shape (fastmask.request) stays
        # behind: it is derived data, and can be larger than the strategy.
        state = self.__dict__.copy()
        state.pop("_fastmask_plan", None)
        return state

    def to_dense(self, shape: tuple[int, ...]) -> np.ndarray:
        """Materialise the mask as a boolean array of ``shape`` (True = keep).

        Meant for inspection and tests; the kernels never call it.
        """
        shape = tuple(int(d) for d in shape)
        canonical_dims(shape)
        self.plan(shape)  # same validation as a real call
        return np.ascontiguousarray(np.broadcast_to(self._dense(shape), shape))

    @property
    def key(self) -> Any:
        """Hashable description of the strategy's kind (not its data), for routing."""
        return type(self).__name__

    # NumPy defers ``array & strategy`` to __rand__ instead of looping over the array.
    __array_ufunc__ = None

    def __and__(self, other: object) -> MaskStrategy:
        if not isinstance(other, MaskStrategy):
            return _not_a_strategy(self, other)
        return AllOf((self, other))

    def __rand__(self, other: object) -> MaskStrategy:
        if not isinstance(other, MaskStrategy):
            return _not_a_strategy(self, other)
        return AllOf((other, self))


def _not_a_strategy(strategy: MaskStrategy, other: object):
    """``strategy & other`` for a non-strategy: arrays get a hint, the rest NotImplemented."""
    if not hasattr(other, "__array__") and not isinstance(other, (list, tuple, bool, int)):
        return NotImplemented
    raise TypeError(
        f"a mask strategy combines with strategies only, not {type(other).__name__}: wrap "
        "the array to say what it means, masks.keep(a) (True = attend) or masks.drop(a) "
        f"(True = masked out), e.g. {strategy!r} & masks.keep(a)"
    )


class AllOf(MaskStrategy):
    """Keys kept by every one of several strategies (``a & b``)."""

    def __init__(self, parts: tuple[MaskStrategy, ...]) -> None:
        flat: list[MaskStrategy] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, AllOf) else (p,))
        self.parts = tuple(flat)
        self.structured = any(p.structured for p in self.parts)
        self.compiled = any(p.compiled for p in self.parts)
        self.immutable = all(p.immutable for p in self.parts)

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        result = MaskPlan()
        for p in self.parts:
            result = result & p.plan(shape)
        return result

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        out = np.ones(shape, dtype=bool)
        for p in self.parts:
            out &= np.broadcast_to(p._dense(shape), shape)
        return out

    @property
    def key(self) -> Any:
        return ("AllOf", *(p.key for p in self.parts))

    def __repr__(self) -> str:
        return " & ".join(repr(p) for p in self.parts)
