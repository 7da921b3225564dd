"""Device arrays: validating and routing ``attention`` calls on GPU memory.

The attention half of :mod:`fastmask.device` (same rules, same backend protocol):
:func:`fastmask.attention` and :func:`fastmask.explain_attention` come here when
``q``, ``k`` or ``v`` exposes ``__cuda_array_interface__``. A backend serves these
calls when its ``ops`` include :data:`fastmask.device.DEVICE_ATTENTION_OP`, and
then implements ``attention_device(request)``: compute a
:class:`DeviceAttentionRequest` (``q4``, ``k4``, ``v4`` into ``out4`` and, when
asked, ``weights4``), writing every element of both (they are allocated with
``empty``, not zero-filled).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import router
from .attention_request import AttentionSizes, plan_keep_and_bounds
from .device import (
    DEVICE_ATTENTION_OP,
    bias_operand,
    host_operand,
    is_device_array,
    mask_operand,
    operand_notes,
    require_backend,
)
from .masks import MaskStrategy
from .masks.base import canonical_dims
from .request import compute_dtype, mask_key
from .rules import Operand, attention_dims
from .strided import Strided

__all__ = [
    "DeviceAttentionCall",
    "DeviceAttentionRequest",
    "attention",
    "explain_attention",
    "prepare_attention",
]


@dataclass(frozen=True)
class DeviceAttentionRequest(AttentionSizes):
    """One attention call on device arrays, as backends see it.

    The device twin of :class:`fastmask.attention_request.AttentionRequest`: the
    same fields, each operand a 4-D :class:`Strided`. ``q4`` ``(B, Hq, Lq, D)``,
    ``k4``/``v4`` ``(B, Hk, Lk, D/Dv)`` are device memory in the inputs' dtype
    (not converted to the compute dtype: backends convert on load); query head
    ``h`` reads kv head ``h // group``. ``out4`` ``(B, Hq, Lq, Dv)`` and
    ``weights4`` ``(B, Hq, Lq, Lk)`` are device memory, *not* zero-filled: a
    backend writes every element (both are None while routing, before they are
    allocated; ``weights4`` stays None without ``return_weights``). ``keep4`` and
    ``bias4`` (scores' shape, zero strides where broadcast) are device or host
    memory, ``bias4`` in the caller's float dtype; ``bounds4`` (``(B, Hq, Lq, 2)``
    int64, kept keys ``[lo, hi)``) is host memory.
    """

    op: str
    q4: Strided
    k4: Strided
    v4: Strided
    out4: Strided | None
    weights4: Strided | None
    keep4: Strided | None
    bias4: Strided | None
    bounds4: Strided | None
    scale: float
    group: int
    h0: int
    compute_dtype: np.dtype
    strategy: MaskStrategy | None
    key: tuple
    return_weights: bool = False
    device: str = "cuda"

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the inputs and outputs."""
        return self.q4.dtype


@dataclass(frozen=True)
class DeviceAttentionCall:
    """A validated device attention call, before the outputs are allocated.

    ``q``, ``k``, ``v`` are broadcast to the call's batch shape (``k``/``v`` to
    ``batch[:-1] + (Hk,)`` with grouped-query attention); ``keep`` and ``bias`` to
    the scores' shape ``batch + (Lq, Lk)``.
    """

    q: Strided
    k: Strided
    v: Strided
    out: Strided | None
    weights: Strided | None
    keep: Strided | None
    bias: Strided | None
    bounds: np.ndarray | None
    scale: float
    group: int
    compute_dtype: np.dtype
    strategy: MaskStrategy | None
    key: tuple
    return_weights: bool

    @property
    def dtype(self) -> np.dtype:
        return self.q.dtype

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-1], self.v.shape[-1])

    @property
    def scores_shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-1], self.k.shape[-2])

    def with_outputs(self, out: Any, weights: Any) -> DeviceAttentionCall:
        """The same call writing into the device arrays ``out`` (and ``weights``)."""
        return replace(
            self,
            out=Strided.of_device(out, "out"),
            weights=None if weights is None else Strided.of_device(weights, "weights"),
        )

    def requests(self) -> list[DeviceAttentionRequest]:
        """The 4-D request(s); several when leading axes don't fold (split along axis 1)."""
        ops = [self.q, self.k, self.v, self.out, self.weights, self.keep, self.bias]
        return self._requests(ops, self.bounds, len(self.scores_shape), 0)

    def _requests(
        self, ops: list[Strided | None], bounds: np.ndarray | None, nd: int, h0: int
    ) -> list[DeviceAttentionRequest]:
        folded = [None if a is None else a.fold() for a in ops]
        if any(f is None and a is not None for f, a in zip(folded, ops, strict=True)):
            q = ops[0]
            assert q is not None
            inner_h = canonical_dims(q.shape)[1] // max(q.shape[1], 1)
            out: list[DeviceAttentionRequest] = []
            for i in range(q.shape[1]):
                sub = [None if a is None else a.index1(i) for a in ops]
                sub_bounds = None if bounds is None else bounds[:, i * inner_h : (i + 1) * inner_h]
                out += self._requests(sub, sub_bounds, nd - 1, h0 + i * inner_h)
            return out
        if nd == 3:
            # (X, 1, ...) -> (1, X, ...): the head axis of 3-D inputs is their first axis.
            folded = [None if a is None else a.moveaxis(0, 1) for a in folded]
            bounds = None if bounds is None else bounds.swapaxes(0, 1)
        q4, k4, v4, out4, w4, keep4, bias4 = folded
        assert q4 is not None and k4 is not None and v4 is not None
        b4 = None if bounds is None else Strided.of_host(bounds)
        return [
            DeviceAttentionRequest(
                DEVICE_ATTENTION_OP, q4, k4, v4, out4, w4, keep4, bias4, b4, self.scale,
                self.group, h0, self.compute_dtype, self.strategy, self.key,
                self.return_weights,
            )
        ]  # fmt: skip


def prepare_attention(
    q: Any,
    k: Any,
    v: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    return_weights: Any = False,
) -> DeviceAttentionCall:
    """Validate an ``attention`` call whose ``q``, ``k`` and ``v`` are device arrays.

    Same rules as :func:`fastmask.attention_request.build_attention_requests`; in
    addition ``q``, ``k`` and ``v`` must all be device arrays (``mask`` and
    ``bias`` may be on the device or the host). Reads no device memory.
    """
    on_host = [name for name, a in (("q", q), ("k", k), ("v", v)) if not is_device_array(a)]
    if on_host:
        one = len(on_host) == 1
        raise TypeError(
            f"q, k and v must all be device arrays (__cuda_array_interface__) or all host "
            f"arrays; {' and '.join(on_host)} {'is' if one else 'are'} on the host. Copy "
            f"{'it' if one else 'them'} to the device first (e.g. numba.cuda.to_device), "
            "or all of them to the host."
        )
    qo, ko, vo = (Operand.of_device(a, name) for a, name in ((q, "q"), (k, "k"), (v, "v")))
    batch, group, hk, lq, d, lk, dv, s = attention_dims(qo, ko, vo, scale, return_weights)
    qs, ks, vs = qo.source, ko.source, vo.source
    cdt = compute_dtype(qs.dtype)

    scores_shape = (*batch, lq, lk)
    target = "the scores'"
    strategy, keep, keep_where = mask_operand(mask, scores_shape, target)
    plan = strategy.plan(scores_shape) if strategy is not None else None
    plan_keep, bounds = plan_keep_and_bounds(plan, scores_shape)
    if plan_keep is not None:
        keep = host_operand(plan_keep).broadcast_to(scores_shape)
        keep_where = "host"
    bs = bias_operand(bias, scores_shape, cdt, target)

    kv_batch = (*batch[:-1], hk) if group > 1 else batch
    q_b = qs.broadcast_to((*batch, lq, d))
    k_b = ks.broadcast_to((*kv_batch, lk, d))
    v_b = vs.broadcast_to((*kv_batch, lk, dv))
    key = (
        DEVICE_ATTENTION_OP,
        qs.shape,
        ks.shape,
        vs.shape,
        qs.dtype.char,
        keep_where,
        None if bs is None else (bs.dtype.char, bs.on_device),
        bounds is not None,
        mask_key(strategy),
        bool(return_weights),
    )
    return DeviceAttentionCall(q_b, k_b, v_b, None, None, keep, bs, bounds, s, group, cdt,
                               strategy, key, bool(return_weights))  # fmt: skip


def attention(
    q: Any,
    k: Any,
    v: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    return_weights: Any = False,
    backend: str | None = None,
) -> Any:
    """:func:`fastmask.attention` for device arrays ``q``, ``k``, ``v``.

    Returns new device arrays allocated by the chosen backend (Numba
    ``DeviceNDArray`` for the ``cuda`` plugin): ``out``, or ``(out, weights)``.
    Nothing is copied to the host; the backend may return before the kernels finish.
    """
    require_backend("q", DEVICE_ATTENTION_OP)
    call = prepare_attention(q, k, v, mask, bias=bias, scale=scale, return_weights=return_weights)
    first = call.requests()[0]
    chosen = router.choose(first) if backend is None else router.forced(backend, first)
    out = chosen.empty(call.out_shape, call.dtype, q)
    weights = chosen.empty(call.scores_shape, call.dtype, q) if call.return_weights else None
    call = call.with_outputs(out, weights)
    rows = int(np.prod(call.q.shape[:-1], dtype=np.int64))
    if rows:  # with no key (Lk == 0) the backend still writes the zero rows
        for request in call.requests():
            router.run(chosen, request)
    return (out, weights) if call.return_weights else out


def _attention_summary(
    call: DeviceAttentionCall, q: Any, k: Any, v: Any, mask: Any, bias: Any, scale: Any
) -> str:
    def desc(a: Any) -> str:
        iface = a.__cuda_array_interface__
        return f"{tuple(iface['shape'])} {np.dtype(iface['typestr'])}"

    head = f"attention(q: {desc(q)}, k: {desc(k)}, v: {desc(v)} on device"
    parts = [head, *operand_notes(mask, bias, scale)]
    if call.return_weights:
        parts.append("return_weights=True")
    return ", ".join(parts) + ")"


def explain_attention(
    q: Any,
    k: Any,
    v: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    return_weights: Any = False,
    backend: str | None = None,
) -> router.Explanation:
    """:func:`fastmask.explain_attention` for device arrays; validates the same way, runs
    nothing."""
    require_backend("q", DEVICE_ATTENTION_OP)
    call = prepare_attention(q, k, v, mask, bias=bias, scale=scale, return_weights=return_weights)
    summary = _attention_summary(call, q, k, v, mask, bias, scale)
    return router.explain(call.requests()[0], summary, backend)
