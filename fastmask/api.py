"""The public entry points: ``masked_softmax`` and ``explain``."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import device, router
from .dtypes import is_bfloat16, to_torch_bfloat16
from .masks import MaskStrategy
from .request import build_softmax_requests
from .threads import get_num_threads

__all__ = ["explain", "masked_softmax"]


def _like(x: Any, result: np.ndarray) -> Any:
    """Return ``result`` as the caller's array type where that is free (torch CPU tensors)."""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
        return result
    if type(x).__module__.split(".")[0] == "torch":
        if is_bfloat16(result.dtype):
            return to_torch_bfloat16(result)
        return sys.modules["torch"].from_numpy(result)
    return result


def masked_softmax(
    x: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: float | None = None,
    axis: int = -1,
    out: Any = None,
    backend: str | None = None,
) -> Any:
    """Softmax of ``x * scale + bias`` along ``axis`` over the kept positions only.

    Parameters
    ----------
    x : array_like
        Logits, float16, bfloat16 (``ml_dtypes.bfloat16``, ``torch.bfloat16``),
        float32 or float64 (NumPy arrays, or anything exposing
        ``__array__``/``__dlpack__`` on the CPU, e.g. a torch CPU tensor, viewed
        without a copy). float16 and bfloat16 are computed in float32.
    mask : bool array or MaskStrategy, optional
        A boolean array broadcastable to ``x`` where **True = keep (attend)**, or a
        strategy from :mod:`fastmask.masks` (``padding``, ``causal``, ``keep``,
        ``drop``, combined with ``&``). Other dtypes raise ``TypeError``: say which
        convention you mean with ``masks.keep(a)``, ``masks.drop(a)`` or ``bias=a``.
    bias : array_like, optional
        Additive float array broadcastable to ``x``, added after scaling (``-inf``
        allowed: TF-style ``mask * -1e9``, PyTorch float masks, ALiBi).
    scale : float, optional
        Multiplies the logits first (fused). Must be finite.
    axis : int
        The softmax axis (structured strategies need the last axis).
    out : ndarray, optional
        Where to write the result: a fresh array of ``x``'s shape and dtype, or ``x``
        itself for in place.
    backend : str, optional
        Force a backend by name (see :func:`fastmask.explain`); by default the
        router runs the cheapest backend that can serve the call.

    Returns
    -------
    ndarray
        The weights, with ``x``'s shape and dtype (a torch tensor sharing memory
        when ``x`` was a torch tensor; ``out`` when given). A row in which nothing is
        kept (all masked, or all logits ``-inf``) is all zeros; a NaN (or a kept
        ``+inf``) makes its whole row NaN. A fresh result of 1 MiB or more is a view
        of a recycled block (:mod:`fastmask.outputs`), never shared while you hold it.

    Raises
    ------
    TypeError
        Unsupported dtypes of ``x``, ``mask`` or ``bias``.
    ValueError
        Shapes that do not broadcast, a bad ``out``, a non-finite ``scale``, an
        unknown or unable ``backend``; a predicate or score function of ``mask``
        that raised while it ran (the message names the row and key; the
        function's own exception is chained).
    fastmask.BackendError
        A backend failed while running the call (never silently retried elsewhere).

    Notes
    -----
    Calling it from inside a Numba ``prange`` loop (or any ``@njit`` function) is
    not supported: Numba refuses to compile the call, and forcing it through
    ``numba.objmode`` can abort the process; call it once on the whole batch
    instead, which runs in parallel over the rows. Python threads, forked and
    spawned processes and joblib workers are fine (docs: "Threads, processes and
    servers").

    Examples
    --------
    >>> import numpy as np, fastmask as fm
    >>> x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    >>> fm.masked_softmax(x, fm.masks.padding(2)).round(3)
    array([[0.269, 0.731, 0.   ],
           [0.269, 0.731, 0.   ]], dtype=float32)
    """
    if device.is_device_array(x):  # GPU memory: validated and routed by fastmask.device
        return device.masked_softmax(
            x, mask, bias=bias, scale=scale, axis=axis, out=out, backend=backend
        )
    requests, result = build_softmax_requests(x, mask, bias=bias, scale=scale, axis=axis, out=out)
    if result.size:
        first = requests[0]
        chosen = router.choose(first) if backend is None else router.forced(backend, first)
        for request in requests:
            router.run(chosen, request)
    return out if out is not None else _like(x, result)


def _summary(x: np.ndarray, mask: Any, bias: Any, scale: Any, axis: int) -> str:
    parts = [f"masked_softmax(x: {x.shape} {x.dtype}, axis={axis}"]
    if mask is not None:
        parts.append(f"mask={mask!r}" if isinstance(mask, MaskStrategy) else "mask=<bool array>")
    if bias is not None:
        parts.append(f"bias={np.shape(bias)}")
    if scale is not None:
        parts.append(f"scale={scale}")
    return ", ".join(parts) + f"), threads={get_num_threads()}"


def explain(
    x: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: float | None = None,
    axis: int = -1,
    out: Any = None,
    backend: str | None = None,
) -> router.Explanation:
    """Say which backend a ``masked_softmax`` call would run on, and why.

    Takes the same arguments as :func:`masked_softmax`, validates them the same
    way, and runs nothing.

    Returns
    -------
    Explanation
        ``.chosen`` (a backend name), ``.candidates`` (every backend's verdict:
        whether it can serve the call, why not, and its estimated cost in
        microseconds); ``print()`` it for a table.
    """
    if device.is_device_array(x):
        return device.explain(x, mask, bias=bias, scale=scale, axis=axis, out=out, backend=backend)
    requests, result = build_softmax_requests(x, mask, bias=bias, scale=scale, axis=axis, out=out)
    summary = _summary(result, mask, bias, scale, axis)
    return router.explain(requests[0], summary, backend)
