"""The ``cython`` backend: ahead-of-time compiled OpenMP kernels (``fastmask/_kernels.pyx``).

No JIT warm-up and the lowest per-call overhead, so it serves first calls and
tiny calls best. Attention runs the fused engine (:mod:`fastmask.kernels.fused_attention`:
one parallel region, no BLAS); with ``return_weights=True`` the shared tiled driver
(:mod:`fastmask.kernels.tiled_attention`) with this backend's softmax kernel.

Every dtype of the contract is served: float16 and bfloat16 are computed in float32
(softmax rows converted inside the kernel; attention's q, k, v converted once by the
request) and rounded back to nearest even as they are stored.
"""

from __future__ import annotations

import os
import warnings

from .. import openblas_spin
from ..hookspecs import hookimpl
from ..kernels import fused_attention, tiled_attention
from ..masks.custom import runs_user_code
from ..threads import openmp_spin_default, threads_for
from ._checkout import source_checkout_message
from .base import Backend, Verdict

try:
    with openmp_spin_default():  # OpenMP reads its settings when it is loaded
        from .. import _kernels
except ImportError as exc:  # built without a compiler, or a broken build
    _kernels = None
    _IMPORT_ERROR = source_checkout_message() or (
        f"compiled extension fastmask._kernels is missing ({exc}); reinstall with a C compiler"
    )
    if source_checkout_message():
        warnings.warn(_IMPORT_ERROR, RuntimeWarning, stacklevel=2)
else:
    _IMPORT_ERROR = ""
    openblas_spin.shorten()  # NumPy's BLAS workers must not spin through our regions
    # GNU OpenMP is not fork-safe. Before a fork the OpenMP pool is released when no
    # region is running, so the child can start a fresh one; otherwise the child
    # runs these kernels serially.
    os.register_at_fork(
        before=_kernels.before_fork,
        after_in_parent=_kernels.after_fork_in_parent,
        after_in_child=_kernels.after_fork_in_child,
    )


class CythonBackend(Backend):
    name = "cython"
    device = "cpu"
    ops = frozenset({"masked_softmax", "attention"})
    description = "Cython + OpenMP kernels (compiled at install, no warm-up)"

    #: Cost model in microseconds, rough, from the W1 and tiny workloads of `fastmask bench`.
    OVERHEAD_US = 1.0
    PER_ELEMENT_US = 0.00022

    _status: tuple = (None, (False, ""))  # (state it was computed for, status)

    def status(self) -> tuple[bool, str]:
        if _kernels is None:
            return False, _IMPORT_ERROR
        # Routing asks on every new call shape: build_info() costs ~30 us, state() ~1 us.
        state = _kernels.state()
        if self._status[0] != state:
            CythonBackend._status = (state, self._describe())
        return self._status[1]

    def _describe(self) -> tuple[bool, str]:
        info = _kernels.build_info()
        threads = "OpenMP" if info["openmp"] else "serial build (no OpenMP)"
        if info["serial_only"]:
            threads += ", serial in this forked child"
        debug = ", debug build (bounds checks)" if info["debug"] else ""
        bf16 = ", bfloat16 rounded by VCVTNEPS2BF16" if info.get("bf16_native") else ""
        return True, f"{threads}, {info['isa']} kernels{bf16}{debug}"

    def check(self, request) -> Verdict:
        if runs_user_code(request):
            if request.op == "attention":
                # The fused engine calls the Numba-compiled row functions from its region.
                fused = fused_attention.estimate(request, _kernels)
                if not fused.ok:
                    return Verdict.no(f"custom predicates and score functions: {fused.reason}")
                return Verdict(True, fused.reason + ", fused user functions", fused.cost)
            return Verdict.no(
                "custom predicates and score functions run in the numba backend "
                "(compiled with Numba; the Cython kernels are compiled ahead of time)"
            )
        if request.op == "attention":
            fused = fused_attention.estimate(request, _kernels)
            if fused.ok:
                return fused
            tiled = tiled_attention.estimate(request, self.OVERHEAD_US, self.PER_ELEMENT_US)
            return Verdict(True, f"{tiled.reason} ({fused.reason})", tiled.cost)
        n = threads_for(request.size, request.rows)
        if not _kernels.openmp_enabled():
            n = 1
        cost = self.OVERHEAD_US + self.PER_ELEMENT_US * request.size / n
        return Verdict(True, f"{n} thread(s)", cost)

    def accepts(self, request) -> Verdict:
        if request.op == "attention" and not runs_user_code(request):
            return Verdict(True, "fused engine or tiled driver", 0.0)  # either one serves it
        return self.check(request)

    def fills_output(self, request) -> bool:
        # The fused engine writes every output row, zeros included.
        return request.op == "attention" and not fused_attention.usable(request, _kernels)

    def masked_softmax(self, request) -> None:
        _kernels.masked_softmax_4d(
            request.x4, request.out4, request.scale, request.keep4, request.bias4,
            request.bounds4, request.h0, threads_for(request.size, request.rows),
        )  # fmt: skip

    def attention(self, request) -> None:
        if not fused_attention.usable(request, _kernels):
            fused_attention.run(request, _kernels)
            return
        # Serial softmax per tile: OpenMP's spinning workers and NumPy's BLAS
        # threads would fight over the cores (see fastmask.kernels.tiled_attention).
        tiled_attention.run(request, _kernels.masked_softmax_4d)


@hookimpl
def fastmask_backends():
    return [CythonBackend()]
