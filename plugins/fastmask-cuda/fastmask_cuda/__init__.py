"""fastmask-cuda: the ``cuda`` backend of fastmask (numba.cuda kernels).

Installing the package registers the backend through the ``fastmask`` entry-point
group; device arrays (anything exposing ``__cuda_array_interface__``) passed to
``fastmask.masked_softmax`` or ``fastmask.attention`` then run on the GPU and the
result stays there.

Importing this package imports nothing from ``numba.cuda`` and compiles nothing.
"""

from .memory import empty, probe, to_device, to_host

__version__ = "0.1.0"

__all__ = ["__version__", "empty", "probe", "to_device", "to_host"]
