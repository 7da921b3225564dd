"""fastmask: fast, correct masked softmax for attention on multi-core CPUs.

>>> import numpy as np, fastmask as fm
>>> w = fm.masked_softmax(np.zeros((2, 4), np.float32), fm.masks.causal())
>>> w.tolist()
[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]
"""

from . import compat, masks, plugins
from ._version import __version__
from .api import explain, masked_softmax
from .attention import attention, explain_attention

# The compiled kernels load with the package, not at the first call: their OpenMP
# runtime takes fastmask's short spin only if it loads before another library's (torch
# ships libgomp), and NumPy's OpenBLAS workers get theirs (fastmask.openblas_spin).
from .backends import cython_backend as _cython_backend  # noqa: F401
from .backends.base import Backend, Verdict
from .hookspecs import hookimpl
from .router import BackendError
from .threads import get_num_threads, set_num_threads

__all__ = [
    "Backend",
    "BackendError",
    "Verdict",
    "__version__",
    "attention",
    "compat",
    "explain",
    "explain_attention",
    "get_num_threads",
    "hookimpl",
    "masked_softmax",
    "masks",
    "plugins",
    "set_num_threads",
]
