"""Built-in backends. Each module is a plugin registered through the same hooks as outside ones."""

from .base import Backend, Verdict

#: Modules registered as plugins at start-up, in this order (ties in cost go to the first).
BUILTIN_PLUGINS = (
    "fastmask.backends.cython_backend",
    "fastmask.backends.numba_backend",
    "fastmask.backends.numpy_backend",
)

__all__ = ["BUILTIN_PLUGINS", "Backend", "Verdict"]
