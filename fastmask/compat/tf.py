"""The TensorFlow transformer tutorial's attention, reproduced on fastmask.

:func:`scaled_dot_product_attention` is the tutorial's function, computed the
way TensorFlow computes it, so that models ported from the tutorial give the
same numbers (to float32 rounding), quirks included:

- ``mask`` uses the tutorial's convention, **1.0 = masked** (the opposite of
  ``fastmask.attention``), and is applied as ``logits += mask * -1e9`` in float32.
- A query row in which every key is masked is *not* zero: its logits are
  ``-1e9 + s_j``, rounded to float32, where the spacing of float32 numbers is 64.
  Where the ``s_j`` of the row round to the same value the row comes out
  uniform; where they differ by more than about 64 it comes out (almost)
  one-hot on the largest. That is what TensorFlow does, and what this does.

:func:`create_padding_mask` and :func:`create_look_ahead_mask` build the
tutorial's float masks; :func:`padding_strategy` and
:func:`look_ahead_strategy` build the same masks as fastmask strategies
(intervals the kernels can skip, never materialised).

Migrating to :func:`fastmask.attention` is one line (note the flipped convention,
spelled out by ``masks.drop``)::

    out, w = scaled_dot_product_attention(q, k, v, mask)   # the tutorial, 1.0 = masked
    out = fastmask.attention(q, k, v, fastmask.masks.drop(mask))   # fused, tiled, skips masked work

The one deliberate difference: in ``fastmask.attention`` a query that can
attend to nothing gets a zero output row instead of the uniform/one-hot
average above. ``fastmask.attention(q, k, v, padding_strategy(seq) &
look_ahead_strategy())`` is the decoder's combined mask
(``tf.maximum(padding_mask, look_ahead_mask)`` in the tutorial).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import masks
from ..api import masked_softmax
from ..masks import MaskStrategy
from ..request import as_array

__all__ = [
    "create_look_ahead_mask",
    "create_padding_mask",
    "look_ahead_strategy",
    "padding_strategy",
    "scaled_dot_product_attention",
]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _float(a: Any, what: str) -> np.ndarray:
    arr = as_array(a, what)
    if arr.dtype not in _FLOATS:
        raise TypeError(
            f"{what} must be float16, float32 or float64 (the tutorial uses float32); "
            f"got {arr.dtype}"
        )
    return arr


def scaled_dot_product_attention(
    q: Any, k: Any, v: Any, mask: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's attention: ``softmax(q k^T / sqrt(dk) + mask * -1e9) v``.

    Parameters
    ----------
    q : array_like, shape (..., Lq, D)
    k : array_like, shape (..., Lk, D)
    v : array_like, shape (..., Lk, Dv)
        Same float dtype (the tutorial, and TensorFlow, use float32).
    mask : array_like or MaskStrategy or None
        Broadcastable to ``(..., Lq, Lk)``; **1.0 = masked** (the tutorial's
        convention; booleans count as 0/1). A fastmask strategy is accepted too
        and means what it means everywhere in fastmask (True = keep): its
        masked positions get the ``-1e9``.

    Returns
    -------
    output : ndarray, shape (..., Lq, Dv)
    attention_weights : ndarray, shape (..., Lq, Lk)

    Notes
    -----
    Computed in the inputs' dtype, step by step as TensorFlow does:
    ``matmul_qk = q @ k^T``; ``logits = matmul_qk / sqrt(dk)`` with ``dk`` the
    float32 (inputs' dtype) of ``D``; ``logits += mask * -1e9`` (the product
    rounded to the dtype first); ``weights = softmax(logits)`` by
    :func:`fastmask.masked_softmax` without a mask; ``output = weights @ v``.
    TensorFlow itself accepts only float32 here; in float16 ``-1e9`` overflows
    to ``-inf``, where TensorFlow's softmax would give NaN for a fully masked row
    and fastmask's gives zeros.

    Examples
    --------
    >>> import numpy as np
    >>> from fastmask.compat import tf
    >>> k = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10], [0, 0, 10]], np.float32)
    >>> v = np.array([[1, 0], [10, 0], [100, 5], [1000, 6]], np.float32)
    >>> out, w = tf.scaled_dot_product_attention(np.array([[0, 10, 0]], np.float32), k, v, None)
    >>> out.round(3), w.round(3)
    (array([[10.,  0.]], dtype=float32), array([[0., 1., 0., 0.]], dtype=float32))
    """
    qa, ka, va = _float(q, "q"), _float(k, "k"), _float(v, "v")
    if not qa.dtype == ka.dtype == va.dtype:
        raise TypeError(
            f"q, k and v must have the same dtype; got {qa.dtype}, {ka.dtype} and {va.dtype}"
        )
    if min(qa.ndim, ka.ndim, va.ndim) < 2:
        raise ValueError("q, k and v must have at least 2 dimensions: (..., L, depth)")
    dt = qa.dtype
    matmul_qk = np.matmul(qa, np.swapaxes(ka, -1, -2))
    dk = dt.type(ka.shape[-1])
    scaled_attention_logits = matmul_qk / np.sqrt(dk)
    if mask is not None:
        if isinstance(mask, MaskStrategy):
            masked = ~mask.to_dense(scaled_attention_logits.shape)
            m = masked.astype(dt)
        else:
            m = as_array(mask, "mask")
            if m.dtype.kind not in "biuf":
                raise TypeError(f"mask must be numeric (1.0 = masked); got dtype {m.dtype}")
            m = m.astype(dt, copy=False)
        scaled_attention_logits = scaled_attention_logits + m * dt.type(-1e9)
    attention_weights = masked_softmax(scaled_attention_logits)
    output = np.matmul(attention_weights, va)
    return output, attention_weights


def create_padding_mask(seq: Any) -> np.ndarray:
    """The tutorial's padding mask: ``1.0`` where ``seq == 0``, shape ``(B, 1, 1, L)``.

    Parameters
    ----------
    seq : array_like of int, shape (B, L)
        Token ids, 0 = padding.
    """
    s = np.asarray(seq)
    if s.ndim != 2:
        raise ValueError(f"seq must have shape (batch, length); got {s.shape}")
    return (s == 0).astype(np.float32)[:, np.newaxis, np.newaxis, :]


def create_look_ahead_mask(size: int) -> np.ndarray:
    """The tutorial's look-ahead mask: ``1 - band_part(ones((size, size)), -1, 0)``.

    ``1.0`` above the diagonal (future keys masked), float32, shape ``(size, size)``.
    """
    return np.float32(1) - np.tril(np.ones((size, size), np.float32))


def padding_strategy(seq: Any) -> MaskStrategy:
    """:func:`create_padding_mask` as a fastmask strategy (True = keep, for ``fastmask.attention``).

    When every sequence's padding (``seq == 0``) is a tail, this is
    ``masks.padding(lengths)``: evaluated as intervals, padded keys skipped.
    Otherwise it is ``masks.drop(create_padding_mask(seq))``.
    """
    s = np.asarray(seq)
    if s.ndim != 2:
        raise ValueError(f"seq must have shape (batch, length); got {s.shape}")
    tokens = s != 0
    lengths = tokens.sum(axis=1)
    if np.array_equal(tokens, np.arange(s.shape[1]) < lengths[:, None]):
        return masks.padding(lengths.astype(np.int64))
    return masks.drop(create_padding_mask(s))


def look_ahead_strategy() -> MaskStrategy:
    """:func:`create_look_ahead_mask` as a fastmask strategy: ``masks.causal()``."""
    return masks.causal()
