"""The public attention entry points: ``attention`` and ``explain_attention``."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import device, device_attention, router
from .api import _like
from .attention_request import build_attention_requests, with_operands
from .masks import MaskStrategy
from .threads import get_num_threads

__all__ = ["attention", "explain_attention"]


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
) -> Any:
    """Scaled dot-product attention: ``masked_softmax(q @ k^T * scale + bias) @ v``.

    Parameters
    ----------
    q : array_like, shape (..., Lq, D)
        Queries; float16, bfloat16, float32 or float64 (NumPy arrays or CPU tensors; or device
        arrays exposing ``__cuda_array_interface__``, with the fastmask-cuda plugin:
        then k and v must be device arrays too, and the results are device arrays).
    k : array_like, shape (..., Lk, D)
        Keys, same dtype as ``q``.
    v : array_like, shape (..., Lk, Dv)
        Values, same dtype as ``q``.
    mask : bool array or MaskStrategy, optional
        On the scores ``(..., Lq, Lk)``, exactly as for :func:`fastmask.masked_softmax`:
        a boolean array where **True = keep**, or a :mod:`fastmask.masks` strategy
        (user predicates and score functions included: the ``cython`` backend calls
        their Numba-compiled code inside its fused engine).
        Other dtypes raise ``TypeError`` (use ``masks.keep(a)``, ``masks.drop(a)`` or
        ``bias=a``).
    bias : array_like, optional
        Additive float array broadcastable to the scores, added after scaling.
    scale : float, optional
        Multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
    return_weights : bool
        Also return the attention weights ``(..., Lq, Lk)`` (this materialises them).
    backend : str, optional
        Force a backend by name (see :func:`explain_attention`).

    Returns
    -------
    out : ndarray, shape (..., Lq, Dv)
        In the inputs' dtype (float16 and bfloat16 are computed in float32). A query with no kept
        key gets a zero row.
    weights : ndarray, shape (..., Lq, Lk)
        Only with ``return_weights=True``: equal to ``masked_softmax`` of the scaled
        scores.

    Notes
    -----
    Leading axes broadcast. Grouped-query attention: when q's head axis (axis -3)
    is a multiple ``Hq = G * Hk`` of k/v's, query head ``h`` uses kv head ``h // G``
    (like PyTorch's ``enable_gqa``); k and v are not repeated in memory.

    The ``cython`` backend runs a fused engine (:mod:`fastmask.kernels.fused_attention`):
    one OpenMP parallel region, flash-attention style, over work items of up to 64
    score rows (the query heads of a GQA group together), visiting only the blocks
    of 64 keys that some row of an item keeps (causal: about half; padding: up to
    each sequence's length); extra memory is a few small buffers per thread, not
    ``Lq x Lk``, and results do not depend on the thread count. With
    ``return_weights=True``, and on the ``numba`` backend, the tiled driver runs
    instead: products through NumPy's BLAS, each tile's masked softmax through the
    backend's kernel (see :mod:`fastmask.kernels.tiled_attention`).

    Raises
    ------
    TypeError
        Unsupported or mismatched dtypes, a non-boolean mask array.
    ValueError
        Shapes that do not match or broadcast (including head counts that are not
        multiples), a non-finite scale, an unknown or unable backend; a predicate
        or score function that raised while it ran (the message names the row).

    Examples
    --------
    >>> import numpy as np, fastmask as fm
    >>> q = np.ones((1, 2, 3, 4), np.float32)
    >>> v = np.arange(6, dtype=np.float32).reshape(1, 1, 3, 2)
    >>> fm.attention(q, q, v, fm.masks.causal())[0, 0]
    array([[0., 1.],
           [1., 2.],
           [2., 3.]], dtype=float32)
    """
    if device.any_device_array(q, k, v):  # GPU memory: validated and routed by fastmask.device
        return device_attention.attention(q, k, v, mask, bias=bias, scale=scale,
                                return_weights=return_weights, backend=backend)  # fmt: skip
    requests, out, weights = build_attention_requests(
        q, k, v, mask, bias=bias, scale=scale, return_weights=return_weights, zeroed=False
    )
    if requests and requests[0].size:
        first = requests[0]
        chosen = router.choose(first) if backend is None else router.forced(backend, first)
        if not chosen.fills_output(first):
            out[...] = 0  # the backend may skip rows and tiles that keep nothing
        for request in requests:
            router.run(chosen, request)
    else:
        out[...] = 0
    if return_weights:
        return _like(q, out), _like(q, weights)
    return _like(q, out)


#: Requests built by :func:`_attention_into`, by call signature: a model calls attention
#: once per layer with operands of equal shapes and strides and the same mask object,
#: and rebuilding (validating, planning the mask, routing) costs more than a decode
#: step's kernel. Bounded like the router's cache.
_templates: dict[tuple, tuple[Any, Any, Any, bool]] = {}
_MAX_TEMPLATES = 1024


def _signature(out: np.ndarray, q: Any, k: Any, v: Any, mask: Any, scale: Any) -> tuple | None:
    """The key of a call whose request can be reused with new operands, else None.

    Only host arrays already in their compute dtype (float32, float64), 4-D (their
    request views are the arrays themselves), with no mask or an immutable mask
    strategy without user code: nothing the request holds can change behind it.
    """
    if not (type(q) is type(k) is type(v) is np.ndarray) or q.ndim != 4 or k.ndim != 4:
        return None
    if mask is not None and not (
        isinstance(mask, MaskStrategy) and mask.immutable and not mask.compiled
    ):
        return None
    if scale is not None and type(scale) is not float:
        return None
    dt = q.dtype
    if dt.char not in "fd" or k.dtype != dt or v.dtype != dt or v.ndim != 4:
        return None
    if k.shape[2] != v.shape[2] or not k.shape[2]:  # the full path says what is wrong
        return None
    kv = (k.shape, k.strides, v.shape, v.strides)
    if mask is None or getattr(mask, "plans_any_lk", False):
        # Nothing in the request depends on Lk but the shapes (and the bounds' clipping)
        kv = (k.shape[:2], k.shape[3], k.strides[3], v.shape[:2], v.shape[3], v.strides[3])
    return (q.shape, q.strides, *kv, out.shape, out.strides, out.dtype, dt, id(mask), scale,
            get_num_threads())  # fmt: skip


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` address the same elements (strides of length-1 axes aside)."""
    return (
        a.shape == b.shape
        and a.ctypes.data == b.ctypes.data
        and all(n == 1 or x == y for n, x, y in zip(a.shape, a.strides, b.strides, strict=True))
    )


def _remember(sig: tuple, mask: Any, request: Any, chosen: Any, fills: bool) -> None:
    if len(_templates) >= _MAX_TEMPLATES:
        _templates.clear()
    # Without the operands: a cached request must not keep a model's KV cache alive.
    bare = dataclasses.replace(request, q4=None, k4=None, v4=None, out4=None)
    _templates[sig] = (mask, bare, chosen, fills)


def _attention_into(
    out: np.ndarray, q: Any, k: Any, v: Any, mask: Any = None, *, bias: Any = None,
    scale: float | None = None,
) -> np.ndarray:  # fmt: skip
    """:func:`attention` written into ``out``, a 4-D array of the output's shape and dtype.

    For integrations that own the output buffer (``fastmask.integrations.torch_ops``
    writes through a transposed view of the ``(B, Lq, H, Dv)`` tensor the framework
    wants, so no copy follows). ``out`` may have any strides with a unit-stride last
    axis; the engine checks that it overlaps no input.

    A repeated call (same shapes, strides, dtype, scale and mask object, an immutable
    strategy, no bias: every layer of a model's forward pass) reuses the first call's
    validated request and routing decision with the new operands.
    """
    sig = _signature(out, q, k, v, mask, scale) if bias is None else None
    hit = _templates.get(sig) if sig is not None else None
    if hit is not None and hit[0] is mask and router.cached(hit[1]) is hit[2]:
        # (a decision that no longer holds, after a plugin change, rebuilds everything)
        _, template, chosen, fills = hit
        request = with_operands(template, q, k, v, out)
        if request.key is not template.key:  # a new Lk: route it (its family is known)
            chosen = router.choose(request)
            fills = chosen.fills_output(request)
            _remember(sig, mask, request, chosen, fills)  # the next layer's call is this one
        if not fills:
            out[...] = 0
        router.run(chosen, request)
        return out
    requests, own, _ = build_attention_requests(q, k, v, mask, bias=bias, scale=scale, zeroed=False)
    if out.shape != own.shape or out.dtype != own.dtype:
        raise ValueError(
            f"out must have the output's shape {own.shape} and dtype {own.dtype}; "
            f"got {out.shape} {out.dtype}"
        )
    if len(requests) != 1 or requests[0].out4.shape != out.shape or not requests[0].size:
        out[...] = attention(q, k, v, mask, bias=bias, scale=scale)  # rare: not one 4-D request
        return out
    request = dataclasses.replace(requests[0], out4=out)
    chosen = router.choose(request)
    fills = chosen.fills_output(request)
    if not fills:
        out[...] = 0
    router.run(chosen, request)
    if (
        sig is not None
        and request.keep4 is None
        and all(_same_view(a, b) for a, b in ((request.q4, q), (request.k4, k), (request.v4, v)))
    ):
        _remember(sig, mask, request, chosen, fills)
    return out


def _summary(q: Any, k: Any, v: Any, mask: Any, bias: Any, scale: Any, rw: bool) -> str:
    def desc(a: Any) -> str:
        a = np.asarray(a) if not hasattr(a, "shape") else a
        return f"{tuple(a.shape)} {a.dtype}"

    parts = [f"attention(q: {desc(q)}, k: {desc(k)}, v: {desc(v)}"]
    if mask is not None:
        parts.append(f"mask={mask!r}" if isinstance(mask, MaskStrategy) else "mask=<bool array>")
    if bias is not None:
        parts.append(f"bias={np.shape(bias)}")
    if scale is not None:
        parts.append(f"scale={scale}")
    if rw:
        parts.append("return_weights=True")
    return ", ".join(parts) + f"), threads={get_num_threads()}"


def explain_attention(
    q: Any,
    k: Any,
    v: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: float | None = None,
    return_weights: bool = False,
    backend: str | None = None,
) -> router.Explanation:
    """Say which backend an :func:`attention` call would run on, and why.

    Takes the same arguments as :func:`attention`, validates them the same way and
    runs nothing (it does allocate the output, as a call would). The costs of the
    tiled backends count only the tiles their masks do not skip.

    Returns
    -------
    Explanation
        ``.chosen``, ``.candidates`` (every backend's verdict and estimated cost in
        microseconds); ``print()`` it for a table.
    """
    if device.any_device_array(q, k, v):
        return device_attention.explain_attention(q, k, v, mask, bias=bias, scale=scale,
                                        return_weights=return_weights, backend=backend)  # fmt: skip
    requests, _, _ = build_attention_requests(
        q, k, v, mask, bias=bias, scale=scale, return_weights=return_weights
    )
    summary = _summary(q, k, v, mask, bias, scale, bool(return_weights))
    return router.explain(requests[0], summary, backend)
