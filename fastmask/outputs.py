"""Output arrays of large calls, recycled once the caller has let go of them.

A fresh 50 MB NumPy array costs more than the softmax written into it: the
kernel's first touch of each page faults, and the operating system zeroes every
page first (about 2 ms for W1 on the reference machine, half the time of the
softmax). Serving loops call with the same shapes over and over and drop each
result before the next call, so fastmask keeps a few large output blocks and
hands one out again once nothing references it any more (the same idea as ONNX
Runtime's and PyTorch's caching allocators).

A block is free when its reference count shows that only this pool holds it:
every array given out is a view whose ``base`` is the block, so while any view
(or anything made from it: a torch tensor, a slice) lives, the block is in use.

``FASTMASK_OUTPUT_POOL_MB`` caps the memory of blocks kept while free (default
256; 0 turns the pool off). Outputs smaller than 1 MiB are plain ``np.empty``;
larger ones always start on a 64-byte boundary, pooled or not.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading

import numpy as np

__all__ = ["clear", "empty", "pooled_bytes"]

#: Below this size a fresh array is cheap: plain np.empty.
MIN_BYTES = 1 << 20
#: At most this many blocks are kept (in use or free).
MAX_BLOCKS = 8
_ALIGN = 64


def _limit_from_env() -> int:
    raw = os.environ.get("FASTMASK_OUTPUT_POOL_MB", "").strip()
    try:
        mb = float(raw) if raw else 256.0
    except ValueError:
        mb = 256.0
    return max(0, int(mb * (1 << 20)))


# Reference counts are how a block is known to be free; a free-threaded CPython
# (no GIL) defers them, so the pool stays off there.
_ENABLED = not sysconfig.get_config_var("Py_GIL_DISABLED")
_max_free_bytes = _limit_from_env()
_lock = threading.Lock()
_blocks: list[np.ndarray] = []  # uint8 blocks, least recently handed out first


def _is_free(i: int) -> bool:
    # References: the list's and getrefcount's argument; a live view adds one.
    return sys.getrefcount(_blocks[i]) == 2


def _trim(keep_bytes: int) -> None:
    """Drop free blocks, oldest first, until the free ones fit in ``keep_bytes``."""
    free = [i for i in range(len(_blocks)) if _is_free(i)]
    total = sum(_blocks[i].nbytes for i in free)
    drop = set()
    for i in free:
        if total <= keep_bytes:
            break
        drop.add(i)
        total -= _blocks[i].nbytes
    if drop:
        _blocks[:] = [b for j, b in enumerate(_blocks) if j not in drop]


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array: a recycled block when one of exactly this
    size is free, else new (and kept for later, within the pool's limits). Arrays of
    ``MIN_BYTES`` or more start on a 64-byte boundary (cache lines: the kernels
    write large aligned outputs with streaming stores)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    if not _ENABLED or nbytes > _max_free_bytes:
        return _view(np.empty(nbytes + _ALIGN, np.uint8), nbytes, shape, dtype)
    with _lock:
        block = None
        for i in range(len(_blocks)):
            if _blocks[i].nbytes == nbytes + _ALIGN and _is_free(i):
                block = _blocks.pop(i)
                break
        if block is None:
            _trim(_max_free_bytes - nbytes)
            block = np.empty(nbytes + _ALIGN, np.uint8)
            if len(_blocks) >= MAX_BLOCKS:
                return _view(block, nbytes, shape, dtype)  # not kept
        _blocks.append(block)  # most recently handed out last
        return _view(block, nbytes, shape, dtype)


def _view(block: np.ndarray, nbytes: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``shape``/``dtype`` on the first 64-byte boundary of ``block``; the view keeps the
    block alive (its ``base`` is the block itself)."""
    start = -block.ctypes.data % _ALIGN
    return block[start : start + nbytes].view(dtype).reshape(shape)


def pooled_bytes() -> tuple[int, int]:
    """``(bytes in use, bytes free)`` of the blocks the pool holds."""
    with _lock:
        free = sum(_blocks[i].nbytes for i in range(len(_blocks)) if _is_free(i))
        return sum(b.nbytes for b in _blocks) - free, free


def clear() -> None:
    """Forget every block (the ones in use stay valid: their arrays hold them)."""
    with _lock:
        _blocks.clear()
