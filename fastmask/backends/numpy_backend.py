"""The ``numpy`` backend: the readable reference, always available.

It materialises the mask (and, for attention, the scores) and computes in
float64 — slow, simple, exact enough to be the yardstick. Routing only picks it
when nothing faster can serve a call.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..hookspecs import hookimpl
from ..masks import custom
from ..reference import masked_softmax_reference
from .base import Backend, Verdict


def _dense_keep(request, n: int | None = None) -> np.ndarray | None:
    keep = request.keep4
    if request.bounds4 is not None:
        n = request.x4.shape[-1] if n is None else n
        k = np.arange(n)
        in_bounds = (k >= request.bounds4[..., :1]) & (k < request.bounds4[..., 1:])
        keep = in_bounds if keep is None else keep & in_bounds
    return keep


def _user_operands(request, scores: np.ndarray, keep: np.ndarray | None):
    """:func:`fastmask.masks.custom.reference_operands` on an attention request's scores,
    in the index convention of ``masked_softmax`` (3-D scores: ``b`` is the head axis)."""
    bias = request.bias4
    swap = request.swap_bh
    if swap:  # (1, X, Lq, Lk) -> (X, 1, Lq, Lk), as masked_softmax indexes 3-D scores
        scores = scores.swapaxes(0, 1)
        keep = None if keep is None else np.broadcast_to(keep, request.scores_shape4).swapaxes(0, 1)
        bias = None if bias is None else bias.swapaxes(0, 1)
    shim = SimpleNamespace(x4=scores, bias4=bias, scale=request.scale, h0=request.h0,
                           predicate=request.predicate, score=request.score)  # fmt: skip
    x, keep, bias, scale = custom.reference_operands(shim, keep)
    if swap:
        x = x.swapaxes(0, 1)
        keep = None if keep is None else keep.swapaxes(0, 1)
        bias = None if bias is None else bias.swapaxes(0, 1)
    return x, keep, bias, scale


class NumpyBackend(Backend):
    name = "numpy"
    device = "cpu"
    ops = frozenset({"masked_softmax", "attention"})
    description = "NumPy reference (float64 arithmetic, materialises masks and scores)"

    #: Rough cost model, microseconds: fixed + per element (+ per flop for attention).
    OVERHEAD_US = 40.0
    PER_ELEMENT_US = 0.02
    PER_FLOP_US = 2e-5
    #: Compiling the loops that evaluate user predicates and score functions over a grid.
    WARMUP_US = 400_000.0

    def check(self, request) -> Verdict:
        cost = self.OVERHEAD_US + self.PER_ELEMENT_US * request.size
        if custom.runs_user_code(request):
            # the user functions are evaluated over the whole grid (compiled), then the reference
            if not custom.grids_ready():
                return Verdict(True, "reference, JIT warm-up first", 2 * cost + self.WARMUP_US)
            return Verdict(True, "reference, materialises the user functions", 2 * cost)
        if request.op == "attention":
            b, h, q, n = request.scores_shape4
            flops = 2 * b * h * q * n * (request.q4.shape[3] + request.v4.shape[3])
            return Verdict(
                True, "reference, materialises the scores", cost + self.PER_FLOP_US * flops
            )
        return Verdict(True, "reference", cost)

    def masked_softmax(self, request) -> None:
        x, keep, bias, scale = request.x4, _dense_keep(request), request.bias4, request.scale
        if custom.runs_user_code(request):
            x, keep, bias, scale = custom.reference_operands(request, keep)
        y = masked_softmax_reference(x, keep=keep, bias=bias, scale=scale, dtype=np.float64)
        np.copyto(request.out4, y, casting="unsafe")

    def attention(self, request) -> None:
        """``softmax(q @ k^T)`` by definition, in float64, scores materialised."""
        b, h, lq, d = request.q4.shape
        _, hk, lk, dv = request.v4.shape
        g = request.group
        # Query head h reads kv head h // g: view q as (B, Hk, g, Lq, D) against (B, Hk, 1, Lk, D).
        q = request.q4.astype(np.float64).reshape(b, hk, g, lq, d)
        k = request.k4.astype(np.float64)[:, :, None]
        v = request.v4.astype(np.float64)[:, :, None]
        scores = np.matmul(q, k.swapaxes(-1, -2)).reshape(b, h, lq, lk)
        keep, bias, scale = _dense_keep(request, lk), request.bias4, request.scale
        if custom.runs_user_code(request):
            scores, keep, bias, scale = _user_operands(request, scores, keep)
        weights = masked_softmax_reference(
            scores, keep=keep, bias=bias, scale=scale, dtype=np.float64
        )
        out = np.matmul(weights.reshape(b, hk, g, lq, lk), v).reshape(b, h, lq, dv)
        np.copyto(request.out4, out, casting="unsafe")
        if request.weights4 is not None:
            np.copyto(request.weights4, weights, casting="unsafe")


@hookimpl
def fastmask_backends():
    return [NumpyBackend()]
