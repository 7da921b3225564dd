"""Masked softmax and attention on dask arrays (the optional ``fastmask[dask]`` extra).

``import fastmask`` never imports dask; ``import fastmask.dask`` does. Every
function here takes :mod:`dask.array` inputs and returns a lazy dask array;
nothing runs until it is computed.

How a call is laid out
----------------------
The logits (or attention scores) are split into blocks by their dask chunks.
Blocks along the batch, head and query axes are independent: each is one task
that calls :func:`fastmask.masked_softmax` (or :func:`fastmask.attention`) on
that block. Structured masks are evaluated once, on the client, and each task
is given only its own rows' kept key intervals; user predicates and score
functions are evaluated per block at global indices; rows chunked along the
softmax axis are combined by a two-pass reduction. A module each:

* :mod:`.operands`: validation on the client, and the masks and bias sorted
  into dask operands and per-block constants;
* :mod:`.blocks`: what each task gets (its rows' intervals, its slices of NumPy
  operands) and what it hands the in-memory call;
* :mod:`.user_functions`: predicates and score functions at global indices;
* :mod:`.split_rows`: the two-pass reduction of rows split along the softmax axis;
* :mod:`.softmax`, :mod:`.attention` (tasks in :mod:`.attention_tasks`): the graphs;
* :mod:`.lazy_dense`: :func:`keep` / :func:`drop`, dense masks that stay dask arrays;
* :mod:`.workers`: how many fastmask threads a task uses inside dask's workers
  (:func:`task_threads`).
"""

from __future__ import annotations

try:
    import dask.array  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fastmask.dask needs dask: pip install 'fastmask[dask]' (dask[array] and distributed)"
    ) from exc

from .attention import attention
from .lazy_dense import LazyDense, drop, keep
from .softmax import masked_softmax
from .workers import task_threads

__all__ = ["LazyDense", "attention", "drop", "keep", "masked_softmax", "task_threads"]
