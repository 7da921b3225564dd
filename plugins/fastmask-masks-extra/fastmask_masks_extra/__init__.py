"""fastmask-masks-extra: an example fastmask plugin of mask strategies.

Adds ``fastmask.masks.alibi``, ``fastmask.masks.strided`` and
``fastmask.masks.global_local`` (once the plugin is installed, or registered
with ``fastmask.plugins.register(fastmask_masks_extra.plugin)``). They can also
be used straight from this package.
"""

from .strategies import (
    ALiBi,
    GlobalLocal,
    Strided,
    alibi,
    alibi_slopes,
    global_local,
    strided,
)

__version__ = "0.1.0"

__all__ = [
    "ALiBi",
    "GlobalLocal",
    "Strided",
    "__version__",
    "alibi",
    "alibi_slopes",
    "global_local",
    "strided",
]
