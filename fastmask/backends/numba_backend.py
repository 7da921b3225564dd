"""The ``numba`` backend: JIT-compiled parallel kernels (``fastmask/kernels/numba_softmax.py``).

Threading: Numba's ``omp`` layer aborts forked children and its ``workqueue``
layer crashes when two Python threads launch parallel kernels at once. fastmask
selects ``workqueue`` (fork-safe) unless ``NUMBA_THREADING_LAYER`` is set, and
serialises its own parallel launches with a process-wide lock (re-created in a
forked child). Serial calls (small inputs) take no lock.

dtypes: float16 and bfloat16 logits are computed in float32 (the kernels take
their bits and convert each row once; a bias arrives in float32), float32 and
float64 in their own precision.

Attention runs the shared tiled driver (:mod:`fastmask.kernels.tiled_attention`)
with this backend's serial softmax kernel on each tile (no parallel launch, so
no lock: the products use NumPy's BLAS threads). User predicates and score
functions run there too, on each tile's rows: this is the compiled path for
``return_weights=True`` with them (the cython backend's fused engine returns no
weights).
"""

from __future__ import annotations

import importlib.util
import os
import threading

from ..hookspecs import hookimpl
from ..kernels import numba_softmax, tiled_attention
from ..masks.custom import runs_user_code
from ..threads import threads_for
from .base import Backend, Verdict

_launch_lock = threading.Lock()
_kernels = None  # fastmask.kernels.numba_softmax, imported on first use (importing numba is slow)


def _reset_lock_in_child() -> None:
    global _launch_lock
    _launch_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def _load():
    global _kernels
    if _kernels is None:
        import numba

        from ..kernels import numba_softmax

        # Select the layer here, before anything launches Numba's threads: the
        # kernels module selects it only when it first compiles, and a first call
        # that runs in parallel calls numba.set_num_threads() (which launches them)
        # before that, which left the process on "omp" (fatal to forked children).
        if "NUMBA_THREADING_LAYER" not in os.environ:
            numba.config.THREADING_LAYER = "workqueue"
        _kernels = numba_softmax
    return _kernels


class NumbaBackend(Backend):
    name = "numba"
    device = "cpu"
    ops = frozenset({"masked_softmax", "attention"})
    description = "Numba parallel kernels (JIT, cached on disk)"

    #: Cost model in microseconds, rough, from the W1 and tiny workloads of `fastmask bench`.
    OVERHEAD_US = 6.0
    PER_ELEMENT_US = 0.00022
    #: Loading (or compiling) the kernels for a dtype the first time in a process.
    WARMUP_US = 300_000.0

    _installed: bool | None = None  # find_spec walks sys.path: once per process, not per call

    def status(self) -> tuple[bool, str]:
        if NumbaBackend._installed is None:
            NumbaBackend._installed = importlib.util.find_spec("numba") is not None
        if not NumbaBackend._installed:
            return False, "numba is not installed"
        return True, ""

    def check(self, request) -> Verdict:
        if not numba_softmax.supports(request.dtype):  # (the kernels' module imports no numba)
            return Verdict.no(
                f"{request.dtype}: the numba kernels take float16, bfloat16, float32 or float64"
            )
        if request.op == "attention":
            custom = runs_user_code(request)
            v = tiled_attention.estimate(request, self.OVERHEAD_US, self.PER_ELEMENT_US)
            reason = v.reason + (", user functions on each tile" if custom else "")
            if _kernels is None or not _kernels.is_compiled(request.compute_dtype, custom):
                return Verdict(True, reason + ", JIT warm-up first", v.cost + self.WARMUP_US)
            return Verdict(True, reason, v.cost)
        n = threads_for(request.size, request.rows)
        cost = self.OVERHEAD_US + self.PER_ELEMENT_US * request.size / n
        custom = runs_user_code(request)
        if _kernels is None or not _kernels.is_compiled(request.dtype, custom):
            return Verdict(True, f"{n} thread(s), JIT warm-up first", cost + self.WARMUP_US)
        return Verdict(True, f"{n} thread(s)" + (", fused user functions" if custom else ""), cost)

    def masked_softmax(self, request) -> None:
        kernels = _load()
        user_fns = {"predicate": request.predicate, "score": request.score}
        custom = runs_user_code(request)
        warm = kernels.is_compiled(request.dtype, custom)
        n = threads_for(request.size, request.rows)
        args = (
            request.x4, request.out4, request.scale, request.keep4, request.bias4,
            request.bounds4, request.h0,
        )  # fmt: skip
        if n == 1:
            kernels.masked_softmax_4d(*args, 1, **user_fns)
        else:
            import numba

            with _launch_lock:
                n = min(n, numba.config.NUMBA_NUM_THREADS)
                numba.set_num_threads(n)
                kernels.masked_softmax_4d(*args, n, **user_fns)
        if not warm:
            from .. import router

            router.invalidate()  # its cost estimate just dropped

    def attention(self, request) -> None:
        kernels = _load()
        custom = runs_user_code(request)
        warm = kernels.is_compiled(request.compute_dtype, custom)
        if not warm and not custom:  # both kernels, as is_compiled() counts
            kernels.compile(request.compute_dtype)  # (a custom one is built on first use)
        # Serial softmax per tile (parallel_softmax=False): the kernel runs with
        # nthreads=1, which launches no parallel region and needs no lock.
        tiled_attention.run(request, kernels.masked_softmax_4d)
        if not warm:
            from .. import router

            router.invalidate()  # its cost estimate just dropped


@hookimpl
def fastmask_backends():
    return [NumbaBackend()]
