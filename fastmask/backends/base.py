"""What a backend is: the interface built-in and plugin backends implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..request import SoftmaxRequest

__all__ = ["Backend", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    """A backend's answer to "can you serve this call, and at what cost?".

    Attributes
    ----------
    ok : bool
        Whether the backend can serve the call.
    reason : str
        Why not (when ``ok`` is False), or a short note on the estimate.
    cost : float
        Estimated time in microseconds (``inf`` when not ok); the router runs the cheapest.
    """

    ok: bool
    reason: str = ""
    cost: float = float("inf")

    @classmethod
    def no(cls, reason: str) -> Verdict:
        return cls(False, reason)


class Backend:
    """Base class of fastmask backends.

    Subclasses set ``name`` and ``device``, and implement :meth:`check` and the
    operations they list in ``ops`` (for now ``masked_softmax``). Return them from a
    ``fastmask_backends`` hook implementation.
    """

    name: ClassVar[str] = "?"
    device: ClassVar[str] = "cpu"
    ops: ClassVar[frozenset[str]] = frozenset({"masked_softmax"})
    description: ClassVar[str] = ""

    def status(self) -> tuple[bool, str]:
        """Return ``(available, note)``: whether it can run at all on this machine."""
        return True, ""

    def check(self, request: SoftmaxRequest) -> Verdict:
        """Say whether this backend can serve ``request``, and its estimated cost."""
        raise NotImplementedError

    def accepts(self, request: SoftmaxRequest) -> Verdict:
        """Whether this backend can serve ``request``; the cost may be left out.

        The router asks this instead of :meth:`check` when it already chose this
        backend for a call of the same family (an attention call with a new key
        count, see :mod:`fastmask.router`). The default is :meth:`check`; override it
        when the estimate costs more than the answer.
        """
        return self.check(request)

    def fills_output(self, request) -> bool:
        """Whether running ``request`` writes every element of ``request.out4``.

        Attention outputs are handed to backends zero-filled unless this says True
        (the default False is always safe: skipped rows and tiles stay zero).
        """
        return False

    def masked_softmax(self, request: SoftmaxRequest) -> None:
        """Compute the masked softmax of ``request.x4`` into ``request.out4``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fastmask backend {self.name!r} ({self.device})>"
