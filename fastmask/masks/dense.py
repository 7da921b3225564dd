"""Dense masks given as arrays: ``keep`` (nonzero = attend) and ``drop`` (nonzero = masked)."""

from __future__ import annotations

import numpy as np

from .base import MaskPlan, MaskStrategy

__all__ = ["DenseMask", "drop", "keep"]


class DenseMask(MaskStrategy):
    """A user-given array, broadcast against the logits along any axis."""

    structured = False

    def __init__(self, array: object, convention: str) -> None:
        a = np.asarray(array)
        if a.dtype.kind not in "biuf":
            raise TypeError(
                f"fastmask.masks.{convention}() takes a boolean or numeric array; "
                f"got dtype {a.dtype}"
            )
        nonzero = a if a.dtype == np.bool_ else a != 0
        self.convention = convention
        # Stored as keep (True = attend), whatever the user's convention was.
        self.array = nonzero if convention == "keep" else ~nonzero

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        try:
            np.broadcast_shapes(self.array.shape, shape)
        except ValueError:
            raise ValueError(
                f"mask of shape {self.array.shape} does not broadcast to the logits' shape {shape}"
            ) from None
        if self.array.ndim > len(shape):
            raise ValueError(
                f"mask has {self.array.ndim} dimensions, more than the logits' {len(shape)}"
            )
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
