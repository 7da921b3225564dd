"""The router: asks every backend about a call and runs the cheapest that can serve it.

Decisions are cached per call signature (``SoftmaxRequest.key``), so a repeat
call costs a dictionary lookup. The cache is cleared when the set of plugins
changes or a backend's cost changes (e.g. once a JIT backend has compiled).

Attention calls also have a *family* (``AttentionRequest.family``: the signature
with the query and key counts rounded to their power-of-two range). A new
signature whose family has a decision asks only that backend whether it can
serve the call, instead of every backend for its cost: the decode steps of a
generation meet a new key count on every step, and a full evaluation costs more
than the step's kernel. :func:`explain` always evaluates every backend.
"""

from __future__ import annotations

import numbers
import threading
import warnings
from dataclasses import dataclass

from . import plugins
from .backends.base import Backend, Verdict
from .masks.custom import UserFunctionError
from .request import SoftmaxRequest

__all__ = ["BackendError", "Candidate", "Explanation", "cached", "choose", "evaluate", "invalidate"]

#: Bound on the decision cache; beyond it the cache starts over (a soak must not grow it).
MAX_CACHED_DECISIONS = 4096

_cache: dict[tuple, Backend] = {}
_families: dict[tuple, Backend] = {}
_lock = threading.Lock()


class BackendError(RuntimeError):
    """A backend failed while running a call it had accepted.

    fastmask does not silently fall back to another backend: a failure there is a
    bug to see, not to hide. The original exception is chained.
    """


@dataclass(frozen=True)
class Candidate:
    """One backend's verdict on one call."""

    name: str
    device: str
    ok: bool
    reason: str
    cost: float


@dataclass(frozen=True)
class Explanation:
    """What :func:`fastmask.explain` returns: the choice and every candidate's verdict."""

    chosen: str | None
    forced: bool
    candidates: tuple[Candidate, ...]
    summary: str

    def __str__(self) -> str:
        lines = [f"call: {self.summary}"]
        if self.chosen is None:
            lines.append("chosen: none — no backend can serve this call")
        else:
            lines.append(f"chosen: {self.chosen}" + (" (forced)" if self.forced else " (cheapest)"))
        width = max([len(c.name) for c in self.candidates] + [7])
        lines.append(
            f"  {'backend':<{width}}  {'device':<6}  {'verdict':<7}  {'cost (us)':>10}  why"
        )
        for c in self.candidates:
            cost = f"{c.cost:10.1f}" if c.ok else f"{'-':>10}"
            verdict = "ok" if c.ok else "cannot"
            mark = "*" if c.name == self.chosen else " "
            lines.append(
                f"{mark} {c.name:<{width}}  {c.device:<6}  {verdict:<7}  {cost}  {c.reason}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def invalidate() -> None:
    """Forget cached routing decisions."""
    with _lock:
        _cache.clear()
        _families.clear()


plugins._on_change.append(invalidate)


def _verdict(backend: Backend, request: SoftmaxRequest, ask: str = "check") -> Verdict:
    # A plugin's bug (raising, or returning the wrong kind of object) must not take
    # routing down: the backend is passed over, with a PluginWarning naming it.
    try:
        if request.op not in backend.ops:
            return Verdict.no(f"does not implement {request.op}")
        available, note = backend.status()
    except Exception as exc:
        return _refused(backend, f"status() failed: {type(exc).__name__}: {exc}")
    if not available:
        return Verdict.no(note or "not available")
    try:
        v = getattr(backend, ask, backend.check)(request)  # (a duck-typed backend: check)
    except Exception as exc:
        return Verdict.no(f"{ask}() raised {type(exc).__name__}: {exc}")
    if not isinstance(v, Verdict) or not isinstance(v.cost, numbers.Real) or v.cost != v.cost:
        return _refused(backend, f"{ask}() returned {v!r}, not a Verdict with a real cost")
    return v


def _refused(backend: Backend, why: str) -> Verdict:
    plugin = getattr(backend, "_fastmask_plugin", "?")
    warnings.warn(
        f"fastmask plugin {plugin!r}: backend {getattr(backend, 'name', backend)!r} {why}; "
        "it is passed over",
        plugins.PluginWarning,
        stacklevel=4,
    )
    return Verdict.no(why)


def evaluate(request: SoftmaxRequest) -> list[Candidate]:
    """Every registered backend's verdict on ``request``, in registration order."""
    out = []
    for name, backend in plugins.backends().items():
        v = _verdict(backend, request)
        out.append(
            Candidate(name, backend.device, v.ok, v.reason, v.cost if v.ok else float("inf"))
        )
    return out


def _cheapest(candidates: list[Candidate]) -> str | None:
    best = None
    for c in candidates:
        if c.ok and (best is None or c.cost < best.cost):
            best = c
    return None if best is None else best.name


def forced(name: str, request: SoftmaxRequest) -> Backend:
    """The backend called ``name``, if it can serve ``request``; else a clear error.

    An accepted forced call is cached like a routed one, so forcing costs no more
    than routing on a repeat call.
    """
    cache_key = (name, request.key) if isinstance(name, str) else None
    backend = _cache.get(cache_key)
    if backend is not None:
        return backend
    table = plugins.backends()
    if cache_key is None or name not in table:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(table)}")
    backend = table[name]
    v = _verdict(backend, request)
    if not v.ok:
        raise ValueError(f"backend {name!r} cannot serve this call: {v.reason}")
    _remember(cache_key, backend)
    return backend


def _remember(key: tuple, backend: Backend) -> None:
    with _lock:
        if len(_cache) >= MAX_CACHED_DECISIONS:
            _cache.clear()
        _cache[key] = backend


def cached(request: SoftmaxRequest) -> Backend | None:
    """The backend a previous :func:`choose` picked for ``request``'s signature, if the
    decision still holds (None once plugins or costs changed it)."""
    return _cache.get(request.key)


def choose(request: SoftmaxRequest) -> Backend:
    """The cheapest backend able to serve ``request`` (cached per call signature; for a
    new signature, the family's backend if it can serve it)."""
    backend = _cache.get(request.key)
    if backend is not None:
        return backend
    family = getattr(request, "family", None)
    backend = None if family is None else _families.get(family)
    if backend is not None and _verdict(backend, request, "accepts").ok:
        _remember(request.key, backend)
        return backend
    candidates = evaluate(request)
    name = _cheapest(candidates)
    if name is None:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in candidates)
        raise ValueError(f"no backend can serve this call ({reasons})")
    backend = plugins.backends()[name]
    _remember(request.key, backend)
    if family is not None:
        with _lock:
            if len(_families) >= MAX_CACHED_DECISIONS:
                _families.clear()
            _families[family] = backend
    return backend


def explain(request: SoftmaxRequest, summary: str, backend: str | None = None) -> Explanation:
    """Build the :class:`Explanation` of routing ``request``."""
    candidates = evaluate(request)
    if backend is not None:
        forced(backend, request)
        chosen = backend
    else:
        chosen = _cheapest(candidates)
    return Explanation(chosen, backend is not None, tuple(candidates), summary)


def run(backend: Backend, request: SoftmaxRequest) -> None:
    """Run ``request`` on ``backend``; a failure is reported as :class:`BackendError`,
    except an error of the user's own predicate or score function (``ValueError``)."""
    try:
        getattr(backend, request.op)(request)
    except UserFunctionError:
        raise
    except Exception as exc:
        raise BackendError(
            f"backend {backend.name!r} failed on {request.op}: {type(exc).__name__}: {exc}"
        ) from exc
