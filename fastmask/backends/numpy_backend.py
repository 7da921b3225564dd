"""The ``numpy`` backend: the readable reference, always available.

It materialises the mask and computes in float64 — slow, simple, exact enough to
be the yardstick. Routing only picks it when nothing faster can serve a call.
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from ..reference import masked_softmax_reference
from .base import Backend, Verdict


def _dense_keep(request) -> np.ndarray | None:
    keep = request.keep4
    if request.bounds4 is not None:
        n = request.x4.shape[-1]
        k = np.arange(n)
        in_bounds = (k >= request.bounds4[..., :1]) & (k < request.bounds4[..., 1:])
        keep = in_bounds if keep is None else keep & in_bounds
    return keep


class NumpyBackend(Backend):
    name = "numpy"
    device = "cpu"
    description = "NumPy reference (float64 arithmetic, materialises masks)"

    #: Rough cost model, microseconds: fixed + per element.
    OVERHEAD_US = 40.0
    PER_ELEMENT_US = 0.02

    def check(self, request) -> Verdict:
        return Verdict(True, "reference", self.OVERHEAD_US + self.PER_ELEMENT_US * request.size)

    def masked_softmax(self, request) -> None:
        y = masked_softmax_reference(
            request.x4,
            keep=_dense_keep(request),
            bias=request.bias4,
            scale=request.scale,
            dtype=np.float64,
        )
        np.copyto(request.out4, y, casting="unsafe")


@hookimpl
def fastmask_backends():
    return [NumpyBackend()]
