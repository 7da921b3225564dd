"""Dense masks given as arrays: ``keep`` (nonzero = attend) and ``drop`` (nonzero = masked)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..rules import HOST, Operand, check_broadcast
from .base import MaskPlan, MaskStrategy

__all__ = ["DenseMask", "as_keep", "check_mask_shape", "drop", "keep"]


def as_keep(a: Any, convention: str, where: str = "fastmask.masks") -> Any:
    """``a`` as a keep mask (True = attend), given its ``convention`` ("keep" or "drop").

    Works on any array with ``dtype``, ``!=`` and ``~`` (NumPy, dask); ``where``
    names the function the user called, for the error on a non-numeric dtype.
    """
    if a.dtype.kind not in "biuf":
        raise TypeError(
            f"{where}.{convention}() takes a boolean or numeric array; got dtype {a.dtype}"
        )
    nonzero = a if a.dtype == np.bool_ else a != 0
    return nonzero if convention == "keep" else ~nonzero


def check_mask_shape(mask_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """Raise ValueError unless a dense mask of ``mask_shape`` broadcasts to logits of ``shape``
    (the rule of :func:`fastmask.rules.check_broadcast`)."""
    op = Operand("mask", tuple(mask_shape), np.dtype(np.bool_), HOST, None)
    check_broadcast(op, tuple(shape), "the logits'")


class DenseMask(MaskStrategy):
    """A user-given array, broadcast against the logits along any axis."""

    structured = False

    def __init__(self, array: object, convention: str) -> None:
        self.convention = convention
        # Stored as keep (True = attend), whatever the user's convention was.
        self.array = as_keep(np.asarray(array), convention)

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        check_mask_shape(self.array.shape, shape)
        return MaskPlan(keep=self.array)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(self.array, shape)

    def __repr__(self) -> str:
        return f"masks.{self.convention}(<{self.array.shape} array>)"


def keep(a: object) -> DenseMask:
    """Dense mask where nonzero/True means *attend* (PyTorch SDPA, JAX, HF ``attention_mask``).

    Parameters
    ----------
    a : array_like
        Boolean or numeric, broadcastable to the logits.
    """
    return DenseMask(a, "keep")


def drop(a: object) -> DenseMask:
    """Dense mask where nonzero/True means *masked out*.

    The TensorFlow tutorial's ``mask`` (1.0 = padding), PyTorch's
    ``key_padding_mask`` and ``torch._masked_softmax`` use this convention.

    Parameters
    ----------
    a : array_like
        Boolean or numeric, broadcastable to the logits.
    """
    return DenseMask(a, "drop")
