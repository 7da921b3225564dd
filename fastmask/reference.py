"""The NumPy reference: the one oracle every backend is checked against.

Written for clarity, not speed: it materialises masks and temporaries freely.
"""

from __future__ import annotations

import numpy as np


def masked_softmax_reference(
    x: np.ndarray,
    keep: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    scale: float | None = None,
    axis: int = -1,
    dtype: np.dtype | type | None = np.float64,
) -> np.ndarray:
    """Masked softmax by definition.

    Parameters
    ----------
    x : ndarray
        Logits.
    keep : ndarray of bool, optional
        Broadcastable to ``x``; True = attend. ``None`` keeps everything.
    bias : ndarray, optional
        Additive, broadcastable to ``x``, added after scaling.
    scale : float, optional
        Multiplies the logits first.
    axis : int
        The softmax axis.
    dtype : dtype, optional
        Arithmetic dtype (float64 by default, for an oracle). ``None`` computes
        in float32 for float16/float32 inputs and float64 for float64.

    Returns
    -------
    ndarray
        Weights in the arithmetic dtype. Rows with no kept finite logit are all
        zeros; a NaN (or a kept ``+inf``) in a row makes the whole row NaN.
    """
    x = np.asarray(x)
    if dtype is None:
        dtype = np.float64 if x.dtype == np.float64 else np.float32
    z = x.astype(dtype)
    if scale is not None:
        z = z * np.asarray(scale, dtype=dtype)
    if bias is not None:
        z = z + np.asarray(bias).astype(dtype)
    if keep is None:
        keep_full = np.ones(z.shape, dtype=bool)
    else:
        keep_full = np.broadcast_to(np.asarray(keep, dtype=bool), z.shape)
    z = np.where(keep_full, z, -np.inf)
    if z.size == 0:
        return z
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        # NaN-ignoring max: NaN reaches the sum below and poisons the row there.
        m = np.max(np.where(np.isnan(z), -np.inf, z), axis=axis, keepdims=True)
        empty = m == -np.inf
        e = np.exp(z - np.where(empty, 0, m))
        e = np.where(keep_full, e, 0)
        s = np.sum(e, axis=axis, keepdims=True)
        y = e / np.where(empty, 1, s)
    y = np.where(empty, 0, y)
    # A NaN anywhere in the kept logits of a row makes every entry of that row NaN.
    y = np.where(np.isnan(s), np.nan, y)
    return y.astype(dtype, copy=False)
