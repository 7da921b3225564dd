"""Hook specifications: what a fastmask plugin may implement.

Built-in backends implement these very hooks (see ``fastmask.backends``);
third-party plugins are found through the ``fastmask`` entry-point group or
registered with :func:`fastmask.plugins.register`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .backends.base import Backend
    from .masks import MaskStrategy

hookspec = pluggy.HookspecMarker("fastmask")
hookimpl = pluggy.HookimplMarker("fastmask")


@hookspec
def fastmask_backends() -> Sequence[Backend]:
    """Return the :class:`fastmask.Backend` objects this plugin provides."""


@hookspec
def fastmask_mask_strategies() -> Mapping[str, Callable[..., MaskStrategy]]:
    """Return named factories of mask strategies, reachable as ``fastmask.masks.<name>``."""
