"""Dense masks held as dask arrays, read block by block: :func:`keep` and :func:`drop`."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from ..masks import MaskStrategy
from ..masks.base import MaskPlan
from ..masks.dense import as_keep, check_mask_shape

__all__ = ["LazyDense", "drop", "keep"]


class LazyDense(MaskStrategy):
    """A dense mask held as a dask array (see :func:`keep` and :func:`drop`).

    Composes with ``&`` like every strategy. The functions of
    :mod:`fastmask.dask` read it block by block; the in-memory functions
    compute it first.
    """

    structured = False

    def __init__(self, array: Any, convention: str) -> None:
        a = array if isinstance(array, da.Array) else da.asarray(array)
        self.convention = convention
        self.array = as_keep(a, convention, "fastmask.dask")  # True = attend, still lazy

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        check_mask_shape(self.array.shape, shape)
        return MaskPlan(keep=np.asarray(self.array))

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.array), shape)

    def __repr__(self) -> str:
        return f"fastmask.dask.{self.convention}(<{self.array.shape} dask array>)"


def keep(a: Any) -> LazyDense:
    """A dense mask from a dask array where nonzero/True means *attend* (read lazily).

    ``fastmask.masks.keep`` converts its argument to NumPy at once (computing a
    dask array); this one keeps it lazy. Composes with ``&``.
    """
    return LazyDense(a, "keep")


def drop(a: Any) -> LazyDense:
    """A dense mask from a dask array where nonzero/True means *masked out* (read lazily)."""
    return LazyDense(a, "drop")
