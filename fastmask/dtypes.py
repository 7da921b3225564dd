"""The floating dtypes fastmask accepts, the dtype each computes in, and bfloat16 views.

bfloat16 is ``ml_dtypes.bfloat16`` for NumPy and ``torch.bfloat16`` for torch tensors.
``ml_dtypes`` takes most of a second to import, so it is imported only when a
bfloat16 is actually needed: a NumPy bfloat16 array means the caller has imported it
already, and a torch bfloat16 tensor imports it on first use.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = [
    "FLOAT16",
    "FLOAT32",
    "FLOAT64",
    "bfloat16",
    "compute_dtype",
    "from_torch_bfloat16",
    "is_bfloat16",
    "is_float",
    "to_torch_bfloat16",
]

FLOAT16, FLOAT32, FLOAT64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

#: Accepted dtype names, for error messages.
ACCEPTED = "float16, bfloat16, float32 or float64"

_bf16: np.dtype | None = None


def bfloat16() -> np.dtype:
    """The NumPy dtype ``ml_dtypes.bfloat16`` (imports ``ml_dtypes`` on first use)."""
    global _bf16
    if _bf16 is None:
        import ml_dtypes

        _bf16 = np.dtype(ml_dtypes.bfloat16)
    return _bf16


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (without importing ``ml_dtypes``)."""
    dt = np.dtype(dtype)
    return (
        dt.kind == "V"
        and dt.itemsize == 2
        and dt.name == "bfloat16"
        and ("ml_dtypes" in sys.modules and dt == bfloat16())
    )


def is_float(dtype: Any) -> bool:
    """Whether fastmask computes with ``dtype``: float16, bfloat16, float32, float64."""
    dt = np.dtype(dtype)
    return dt in (FLOAT16, FLOAT32, FLOAT64) or is_bfloat16(dt)


def compute_dtype(dtype: Any) -> np.dtype:
    """float64 for float64; float32 for float32, float16 and bfloat16."""
    return FLOAT64 if np.dtype(dtype) == FLOAT64 else FLOAT32


def _is_torch_bfloat16(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor) and obj.dtype == torch.bfloat16


def from_torch_bfloat16(obj: Any) -> Any:
    """A bfloat16 torch tensor as the int16 tensor of its bits, or None for anything else.

    The caller views that as a NumPy array (``np.asarray``: zero-copy on the CPU, an
    error for tensors that need grad or live elsewhere) and then as ``bfloat16()``.
    """
    if not _is_torch_bfloat16(obj):
        return None
    return obj.view(sys.modules["torch"].int16)


def to_torch_bfloat16(result: np.ndarray) -> Any:
    """A bfloat16 NumPy array as a ``torch.bfloat16`` tensor on the same memory."""
    torch = sys.modules["torch"]
    return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
