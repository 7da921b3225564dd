"""The entry point of the plugin: contributes mask strategies to ``fastmask.masks``.

Found through ``[project.entry-points.fastmask] masks-extra = "fastmask_masks_extra.plugin"``,
or registered at run time with ``fastmask.plugins.register(fastmask_masks_extra.plugin)``.
Importing it compiles nothing.
"""

from __future__ import annotations

from fastmask import hookimpl

from .strategies import alibi, global_local, strided

__all__ = ["STRATEGIES", "fastmask_mask_strategies"]

#: What the plugin adds, by the name it has in ``fastmask.masks``.
STRATEGIES = {"alibi": alibi, "strided": strided, "global_local": global_local}


@hookimpl
def fastmask_mask_strategies():
    return dict(STRATEGIES)
