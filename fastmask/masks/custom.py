"""User-defined mask predicates and score functions, compiled with Numba and fused into the kernel.

``predicate(fn)`` turns ``fn(b, h, q_idx, k_idx) -> bool`` into a mask strategy
(FlexAttention's ``mask_mod``, on the CPU); ``score(fn)`` turns
``fn(score, b, h, q_idx, k_idx) -> score`` into a *score modifier* (ALiBi,
relative position biases, soft-capping) that rides along the mask: it keeps
every key and rewrites the scores ``x * scale + bias`` before masking. Both
compose with ``&`` with every other strategy.

Index convention (as for every strategy), for logits of shape ``(..., Lq, Lk)``:
``b`` is the index on the first axis when ``x.ndim >= 3`` (else 0), ``h`` the
flat index over the axes between it and ``Lq`` (else 0), ``q_idx``/``k_idx``
the query/key positions. All four are int64 inside the kernel.

How they run
------------
Each function is compiled once (per compute dtype for score functions) into a
Numba *row function* that evaluates it over one row of keys with the function
inlined into the loop (:func:`fastmask.kernels.numba_softmax.predicate_row_function`).
The ``numba`` backend calls it once per row from its masked-softmax kernel; the
kernel itself is compiled once per dtype, not per predicate. In attention the
``cython`` backend's fused engine calls the same row functions from its
parallel region, once per row and block of keys (the ``numba`` backend does not
serve them in attention). Kept intervals of the other strategies in a
composition still narrow each row first; the predicate filters inside them.
The ``numpy`` reference backend evaluates the same row functions over the
whole grid (materialising the mask); ``cython`` does not serve them in
``masked_softmax``.

Arrays the function reads (closure variables or module globals) are *frozen*
by Numba when it is compiled: their contents are copied into the compiled
code as constants, on the first call that uses the predicate (or the first
``to_dense``). Later changes to those arrays are not seen; make a new
predicate for new data. The copy is part of the compiled code, so large
arrays make compilation slower. Indexing inside the compiled code is not
bounds-checked (an index out of range reads garbage rather than raising).

Errors: at creation the function is called once in Python on ``(0, 0, 0, 0)``
(``(0.0, 0, 0, 0, 0)`` for scores), and a function that raises there or
returns the wrong kind of value (a predicate must return ``bool`` or
``numpy.bool_``, a score function a real number) is a ``TypeError``. Numba
typing or compilation errors surface as a ``TypeError`` naming the function
at the first call. If it raises at run time on some row, the call fails with
a ``ValueError`` that names the function and the row.
"""

from __future__ import annotations

import itertools
import numbers
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .base import MaskPlan, MaskStrategy, canonical_dims

__all__ = [
    "Predicate",
    "ScoreFunction",
    "UserFunctionError",
    "all_predicates",
    "compose_scores",
    "grids_ready",
    "predicate",
    "prepare",
    "reference_operands",
    "runs_user_code",
    "score",
]


class UserFunctionError(ValueError):
    """A user predicate or score function raised while a kernel ran it.

    Raised as is, not as a ``BackendError``: the bug is in the function, and
    every backend reports it the same way (the original exception is chained).
    """


_tokens = itertools.count(1)
_lock = threading.RLock()

#: Bound on the cache of combined predicates / composed score functions.
MAX_COMBINED = 256
_combined: dict[tuple, Any] = {}


#: Bound on the compiled row functions shared between strategies built from the same
#: function (the same code, closure values, defaults and globals it reads).
MAX_SHARED_ROWS = 512
_shared_rows: dict[tuple, Any] = {}


def _code_key(fn: Callable) -> tuple | None:
    """What Numba compiles into a function's machine code: its code, closure values,
    defaults and the globals it names (Numba freezes globals at compile time). Two
    functions with equal keys compile to the same code, so a service that wraps the
    same function in a new ``predicate(...)`` per request compiles it once (Numba's
    machine code is never freed). None when some value cannot be a dict key: that
    function is compiled for its own strategies only."""
    try:
        code = fn.__code__
        # With each value's type: 1, 1.0 and True are equal keys but compile differently.
        cells = tuple((type(v), v) for v in (c.cell_contents for c in fn.__closure__ or ()))
        glb = fn.__globals__
        names = tuple((n, type(glb[n]), glb[n]) for n in code.co_names if n in glb)
        kwdefaults = tuple(sorted((fn.__kwdefaults__ or {}).items()))
        key = (code, cells, fn.__defaults__, kwdefaults, names)
        hash(key)
    except (AttributeError, TypeError, ValueError):
        return None
    return key


def _is_dispatcher(fn: object) -> bool:
    return hasattr(fn, "py_func") and hasattr(fn, "nopython_signatures")


def _function_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _short(exc: BaseException, lines: int = 12) -> str:
    text = str(exc).strip().splitlines()
    more = f"\n... ({len(text) - lines} more lines)" if len(text) > lines else ""
    return "\n".join(text[:lines]) + more


class _UserFunction(MaskStrategy):
    """What predicates and score functions share: a user function compiled on demand."""

    kind = "function"  # for messages
    _factory = "?"  # the fastmask.masks function that makes it
    compiled = True

    def __init__(self, fn: Callable, name: str | None, *, check: bool = True) -> None:
        if not callable(fn):
            raise TypeError(f"fastmask.masks.{self._factory}() takes a function; got {fn!r}")
        self.fn = fn.py_func if _is_dispatcher(fn) else fn  # the Python function
        self._given_dispatcher = _is_dispatcher(fn)
        self._dispatcher = fn if self._given_dispatcher else None
        self.name = name or _function_name(self.fn)
        self._token = next(_tokens)
        self._rows: dict[str, Any] = {}  # compute dtype char -> compiled row function
        self._code_key = _code_key(self.fn)
        if check:
            self._check_in_python()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rows"] = {}  # machine code: compiled again where it is unpickled
        state["_code_key"] = None  # code objects do not pickle: made again there
        if not self._given_dispatcher:
            state["_dispatcher"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._token = next(_tokens)  # tokens identify objects within one process
        self._code_key = _code_key(self.fn)

    def _check_in_python(self) -> None:
        raise NotImplementedError

    def _jitted(self):
        """The Numba dispatcher of the function (made on first use)."""
        if self._dispatcher is None:
            import numba

            self._dispatcher = numba.njit(self.fn)
        return self._dispatcher

    def _make_row_function(self, compute_dtype: np.dtype):
        raise NotImplementedError

    def row_function(self, compute_dtype: Any) -> int:
        """Address of the compiled row function for ``compute_dtype`` (compiled once).

        Raises
        ------
        TypeError
            When Numba cannot compile the function, or types its result wrongly.
        """
        dt = np.dtype(compute_dtype)
        slot = self._slot(dt)
        row = self._rows.get(slot)
        if row is None:
            with _lock:
                row = self._rows.get(slot)
                shared = None if self._code_key is None else (type(self), self._code_key, slot)
                if row is None and shared is not None:
                    row = _shared_rows.get(shared)
                if row is None:
                    from ..kernels.numba_softmax import ReturnTypeError

                    try:
                        row = self._make_row_function(dt)
                    except ReturnTypeError as exc:
                        raise TypeError(f"{self.kind} {self.name!r} {exc}") from exc
                    except Exception as exc:
                        raise self._compile_error(exc) from exc
                    if shared is not None:
                        if len(_shared_rows) >= MAX_SHARED_ROWS:
                            del _shared_rows[next(iter(_shared_rows))]  # the oldest
                        _shared_rows[shared] = row
                self._rows[slot] = row
        return row.address

    def _compile_error(self, exc: BaseException) -> TypeError:
        return TypeError(
            f"{self.kind} {self.name!r} could not be compiled with Numba (fastmask compiles "
            f"it in nopython mode; use only what Numba supports): "
            f"{type(exc).__name__}: {_short(exc)}"
        )

    def _slot(self, dt: np.dtype) -> str:
        return dt.char

    def _compiled_row(self, compute_dtype: Any):
        self.row_function(compute_dtype)
        return self._rows[self._slot(np.dtype(compute_dtype))]

    def _call_python(self, b: int, h: int, q: int, k: int) -> Any:
        raise NotImplementedError

    def row_failed(self, b: int, h: int, q: int, n: int) -> None:
        """Raise the error of row ``(b, h, q)`` (keys ``0 <= k < n``), where compiled code failed.

        Numba does not keep the exception, so the row is evaluated again in
        Python to find and report it.
        """
        where = f"b={b}, h={h}, q_idx={q}"
        found = self.python_error(b, h, q, n)
        if found is not None:
            k, exc = found
            raise UserFunctionError(
                f"{self.kind} {self.name!r} raised {type(exc).__name__} at "
                f"({where}, k_idx={k}): {exc}"
            ) from exc
        raise UserFunctionError(
            f"{self.kind} {self.name!r} raised an exception in its compiled code on the row "
            f"({where}); it does not raise when run in Python, so the message is not known"
        )

    def python_error(self, b: int, h: int, q: int, n: int) -> tuple[int, Exception] | None:
        """``(k_idx, exception)`` of the first key of row ``(b, h, q)`` on which the
        function raises when run in Python, or None."""
        for k in range(n):
            try:
                self._call_python(b, h, q, k)
            except Exception as exc:
                return k, exc
        return None

    @property
    def key(self) -> Any:
        return (type(self).__name__, self._token)


class Predicate(_UserFunction):
    """A user predicate ``fn(b, h, q_idx, k_idx) -> bool`` (True = keep), fused into the kernel."""

    kind = "predicate"
    _factory = "predicate"

    def _check_in_python(self) -> None:
        try:
            value = self.fn(0, 0, 0, 0)
        except Exception as exc:
            raise TypeError(
                f"predicate {self.name!r} raised {type(exc).__name__} when called as "
                f"{self.name}(b=0, h=0, q_idx=0, k_idx=0): {exc}"
            ) from exc
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(
                f"predicate {self.name!r} must return a bool (True = keep); "
                f"{self.name}(0, 0, 0, 0) returned {type(value).__name__} {value!r}"
            )

    def _slot(self, dt: np.dtype) -> str:
        return ""  # one row function for every dtype (it writes bytes)

    def _make_row_function(self, compute_dtype: np.dtype):
        from ..kernels.numba_softmax import predicate_row_function

        return predicate_row_function(self._jitted())

    def _call_python(self, b: int, h: int, q: int, k: int) -> Any:
        return self.fn(b, h, q, k)

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        canonical_dims(shape)
        return MaskPlan(predicate=self)

    def grid(self, shape4: tuple[int, int, int, int], h0: int = 0) -> np.ndarray:
        """The predicate over a whole ``(B, H, Q, N)`` grid (heads from ``h0``), compiled."""
        from ..kernels.numba_softmax import predicate_grid

        keep, failed = predicate_grid(self._compiled_row(np.float64), shape4, h0)
        if failed >= 0:
            _, h, q, _ = shape4
            self.row_failed(failed // (h * q), h0 + (failed // q) % h, failed % q, shape4[3])
        return keep

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.grid(canonical_dims(shape)).reshape(shape)

    def __repr__(self) -> str:
        return f"masks.predicate({self.name})"


class ScoreFunction(_UserFunction):
    """A user score modifier ``fn(score, b, h, q_idx, k_idx) -> score``, fused into the kernel.

    It rides along the mask as a strategy: it keeps every key, and replaces
    each score ``x * scale + bias`` by ``fn(score, ...)`` before masking.
    """

    kind = "score function"
    _factory = "score"

    def _check_in_python(self) -> None:
        try:
            value = self.fn(0.0, 0, 0, 0, 0)
        except Exception as exc:
            raise TypeError(
                f"score function {self.name!r} raised {type(exc).__name__} when called as "
                f"{self.name}(score=0.0, b=0, h=0, q_idx=0, k_idx=0): {exc}"
            ) from exc
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"score function {self.name!r} must return the new score (a real number); "
                f"{self.name}(0.0, 0, 0, 0, 0) returned {type(value).__name__} {value!r}"
            )

    def _make_row_function(self, compute_dtype: np.dtype):
        from ..kernels.numba_softmax import score_row_function

        return score_row_function(self._jitted(), compute_dtype)

    def _call_python(self, b: int, h: int, q: int, k: int) -> Any:
        return self.fn(0.0, b, h, q, k)

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        canonical_dims(shape)
        return MaskPlan(score=self)

    def apply(self, z4: np.ndarray, h0: int = 0) -> None:
        """Apply the function in place to C-contiguous scores ``z4`` ``(B, H, Q, N)`` (compiled)."""
        from ..kernels.numba_softmax import score_grid

        failed = score_grid(self._compiled_row(z4.dtype), z4, h0)
        if failed >= 0:
            _, h, q, n = z4.shape
            self.row_failed(failed // (h * q), h0 + (failed // q) % h, failed % q, n)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.ones((1,) * len(shape), bool)  # a score modifier masks nothing

    def __repr__(self) -> str:
        return f"masks.score({self.name})"


def predicate(fn: Callable, *, name: str | None = None) -> Predicate:
    """A mask from a Python function ``fn(b, h, q_idx, k_idx) -> bool`` (True = keep).

    Usable as a decorator. The function is compiled with Numba (nopython mode)
    on the first call that uses it, once, and fused into the ``numba``
    backend's kernel: no Python call per element. Strategies made from the
    same function (the same code, closure values, defaults and the globals it
    names) share the compiled code, so ``predicate(f)`` anew for every request
    compiles once; a new closure value is new code (Numba freezes it in).

    Parameters
    ----------
    fn : callable
        ``fn(b, h, q_idx, k_idx)`` with int64 indices (see the module docstring
        for what they mean), returning a bool. It may read arrays and numbers
        from its closure or module globals; Numba freezes them when it compiles.
    name : str, optional
        For messages and ``repr`` (default: the function's qualified name).

    Returns
    -------
    Predicate
        A mask strategy; combine with ``&`` (e.g. ``causal() & predicate(f)``:
        the causal interval narrows each row, ``f`` filters inside it).

    Raises
    ------
    TypeError
        ``fn`` raises, or returns a non-bool, when called as ``fn(0, 0, 0, 0)``.

    Examples
    --------
    >>> import numpy as np, fastmask as fm
    >>> kinds = np.array([0, 0, 1, 1])  # e.g. a per-token type
    >>> @fm.masks.predicate
    ... def same_kind(b, h, q_idx, k_idx):
    ...     return kinds[q_idx] == kinds[k_idx]
    >>> same_kind.to_dense((4, 4)).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 1],
           [0, 0, 1, 1]])
    """
    return Predicate(fn, name)


def score(fn: Callable, *, name: str | None = None) -> ScoreFunction:
    """A score modifier from ``fn(score, b, h, q_idx, k_idx) -> score``, fused into the kernel.

    Passed as (or combined with ``&`` into) ``mask=``: it keeps every key and
    replaces each score ``x * scale + bias`` by ``fn(score, b, h, q_idx,
    k_idx)`` before masking (ALiBi, relative position biases, soft-capping).
    ``score`` is in the compute dtype (float32 for float16/float32 logits,
    float64 for float64); the result is converted back to it. Returning
    ``-inf`` masks a key. Several score functions in one ``&`` apply left to
    right.

    Parameters
    ----------
    fn : callable
        ``fn(score, b, h, q_idx, k_idx)``; indices as for :func:`predicate`.
    name : str, optional
        For messages and ``repr``.

    Raises
    ------
    TypeError
        ``fn`` raises, or does not return a real number, when called as
        ``fn(0.0, 0, 0, 0, 0)``.

    Examples
    --------
    >>> import numpy as np, fastmask as fm
    >>> @fm.masks.score
    ... def softcap(s, b, h, q_idx, k_idx):
    ...     return 5.0 * np.tanh(s / 5.0)
    >>> x = np.array([[0.0, 100.0]], np.float32)
    >>> fm.masked_softmax(x, softcap & fm.masks.causal(1)).round(4)
    array([[0.0067, 0.9933]], dtype=float32)
    """
    return ScoreFunction(fn, name)


# --------------------------------------------------------------------------
# composition (MaskPlan.__and__)


def _remember(key: tuple, make: Callable[[], Any]) -> Any:
    with _lock:
        found = _combined.get(key)
        if found is None:
            if len(_combined) >= MAX_COMBINED:
                _combined.clear()
            found = _combined[key] = make()
        return found


class _AllPredicates(Predicate):
    """Several predicates as one: kept where all keep (one compiled function)."""

    def __init__(self, parts: tuple[Predicate, ...]) -> None:
        self.parts = parts

        def all_keep(b, h, q, k):
            return all(p.fn(b, h, q, k) for p in parts)

        super().__init__(all_keep, " & ".join(p.name for p in parts), check=False)

    def __reduce__(self):
        return _AllPredicates, (self.parts,)

    def _jitted(self):
        if self._dispatcher is None:
            import numba

            fns = [p._jitted() for p in self.parts]
            combined = fns[0]
            for f in fns[1:]:
                combined = numba.njit(_and(combined, f))
            self._dispatcher = combined
        return self._dispatcher


def _and(f, g):
    def both(b, h, q, k):
        return f(b, h, q, k) and g(b, h, q, k)

    return both


class _ComposedScores(ScoreFunction):
    """Several score functions applied left to right (one compiled function)."""

    def __init__(self, parts: tuple[ScoreFunction, ...]) -> None:
        self.parts = parts

        def composed(s, b, h, q, k):
            for p in parts:
                s = p.fn(s, b, h, q, k)
            return s

        super().__init__(composed, " then ".join(p.name for p in parts), check=False)

    def __reduce__(self):
        return _ComposedScores, (self.parts,)

    def _jitted(self):
        if self._dispatcher is None:
            import numba

            fns = [p._jitted() for p in self.parts]
            composed = fns[0]
            for f in fns[1:]:
                composed = numba.njit(_then(composed, f))
            self._dispatcher = composed
        return self._dispatcher


def _then(f, g):
    def both(s, b, h, q, k):
        return g(f(s, b, h, q, k), b, h, q, k)

    return both


def _flatten(x: Any, cls: type) -> tuple:
    return x.parts if isinstance(x, cls) else (x,)


def all_predicates(a: Predicate | None, b: Predicate | None) -> Predicate | None:
    """``a`` and ``b`` combined (kept where both keep); the same object for the same parts."""
    if a is None or b is None:
        return a if b is None else b
    parts = _flatten(a, _AllPredicates) + _flatten(b, _AllPredicates)
    return _remember(("and", *(p._token for p in parts)), lambda: _AllPredicates(parts))


def compose_scores(a: ScoreFunction | None, b: ScoreFunction | None) -> ScoreFunction | None:
    """``a`` then ``b``; the same object for the same parts."""
    if a is None or b is None:
        return a if b is None else b
    parts = _flatten(a, _ComposedScores) + _flatten(b, _ComposedScores)
    return _remember(("then", *(p._token for p in parts)), lambda: _ComposedScores(parts))


# --------------------------------------------------------------------------
# what the request builder and the backends use


def prepare(plan: MaskPlan | None, compute_dtype: Any) -> tuple[Any, Any]:
    """Compile a plan's predicate and score function for ``compute_dtype``.

    Returns ``(predicate, score)`` (either may be None). Compilation errors are
    raised here, as ``TypeError``, before any backend runs.
    """
    if plan is None:
        return None, None
    for fn in (plan.predicate, plan.score):
        if fn is not None:
            fn.row_function(compute_dtype)
    return plan.predicate, plan.score


def reference_operands(request, keep: np.ndarray | None):
    """``(x, keep, bias, scale)`` for the NumPy reference with the request's user functions.

    The predicate is materialised over the grid (ANDed with ``keep``); a score
    function is applied to ``x * scale + bias`` computed in float64, which is
    returned as the logits (then with no bias and no scale).
    """
    x, bias, scale = request.x4, request.bias4, request.scale
    shape4 = x.shape
    if request.predicate is not None:
        grid = request.predicate.grid(shape4, request.h0)
        keep = grid if keep is None else keep & grid
    if request.score is not None:
        z = np.ascontiguousarray(x, dtype=np.float64) * scale
        if bias is not None:
            z += bias
        request.score.apply(z, request.h0)
        x, bias, scale = z, None, None
    return x, keep, bias, scale


def grids_ready() -> bool:
    """True once the loops that evaluate user functions over a whole grid are compiled."""
    from ..kernels import numba_softmax

    return numba_softmax.grids_ready()


def runs_user_code(request: Any) -> bool:
    """True when a backend request carries a user predicate or score function.

    Backends that cannot run compiled user code decline such requests. Requests
    with ``predicate``/``score`` fields (masked softmax) say so there; for the
    others the strategy's :attr:`~fastmask.masks.MaskStrategy.compiled` flag does.
    """
    if hasattr(request, "predicate"):
        return request.predicate is not None or getattr(request, "score", None) is not None
    return bool(getattr(getattr(request, "strategy", None), "compiled", False))
