"""Mask strategies: which keys each query attends to.

Every strategy composes with ``&`` and has ``.to_dense(shape)``. Structured
strategies (``padding``, ``causal``, ``sliding_window``, ``prefix_lm``,
``segments``) are evaluated per row as kept intervals and never materialised;
dense ones (``keep``, ``drop``) are read through their broadcast strides.
``predicate(f)`` and ``score(f)`` take user functions, compiled with Numba and
fused into the ``numba`` backend's kernel (:mod:`fastmask.masks.custom`).
"""

from .base import AllOf, MaskPlan, MaskStrategy
from .custom import Predicate, ScoreFunction, predicate, score
from .dense import DenseMask, drop, keep
from .structured import Causal, Padding, causal, padding
from .windows import PrefixLM, Segments, SlidingWindow, prefix_lm, segments, sliding_window

__all__ = [
    "AllOf",
    "Causal",
    "DenseMask",
    "MaskPlan",
    "MaskStrategy",
    "Padding",
    "Predicate",
    "PrefixLM",
    "ScoreFunction",
    "Segments",
    "SlidingWindow",
    "causal",
    "drop",
    "keep",
    "padding",
    "predicate",
    "prefix_lm",
    "score",
    "segments",
    "sliding_window",
]


def __getattr__(name: str):
    """Mask strategies contributed by plugins are reachable as ``fastmask.masks.<name>``."""
    from .. import plugins

    factories = plugins.mask_strategies()
    if name in factories:
        return factories[name]
    raise AttributeError(f"module 'fastmask.masks' has no attribute {name!r}")
