"""The entry point of the fastmask plugin: registers the ``cuda`` backend.

Found through ``[project.entry-points.fastmask] cuda = "fastmask_cuda.plugin"``,
or registered at run time with ``fastmask.plugins.register(fastmask_cuda.plugin)``.
Importing it imports nothing from ``numba.cuda``.
"""

from __future__ import annotations

from fastmask import hookimpl

from .backend import CudaBackend

__all__ = ["BACKEND", "fastmask_backends"]

#: The one backend instance (its launch and kernel caches are process-wide anyway).
BACKEND = CudaBackend()


@hookimpl
def fastmask_backends():
    return [BACKEND]
