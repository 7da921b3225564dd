"""``fastmask demo``: padding and causal masks on a small batch, and the ``-1e9`` pitfall."""

from __future__ import annotations

import numpy as np

from . import explain, masked_softmax, masks


def _softmax_tf_style(x: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """The TensorFlow tutorial's recipe: add ``mask * -1e9``, then a plain softmax."""
    z = x + drop * x.dtype.type(-1e9)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _show(title: str, w: np.ndarray) -> None:
    print(title)
    with np.printoptions(precision=3, suppress=True, floatmode="fixed"):
        for row in np.asarray(w, np.float64):
            print("   ", row)


def run_demo() -> int:
    rng = np.random.default_rng(0)
    batch, heads, lq, lk = 3, 2, 4, 6
    x = rng.standard_normal((batch, heads, lq, lk)).astype(np.float32)
    lengths = [6, 3, 0]  # the third sequence is all padding

    print(f"logits: {x.shape} float32 (batch, heads, queries, keys); key lengths {lengths}\n")

    pad = masks.padding(lengths)
    w = masked_softmax(x, pad)
    _show("1) padding(lengths): batch 1, head 0 — keys 3..5 are padding, so weight 0", w[1, 0])
    print(f"   routed to: {explain(x, pad).chosen}\n")

    dec = masks.causal() & masks.padding(lengths)
    w = masked_softmax(x, dec, scale=1 / np.sqrt(lk))
    _show("2) causal() & padding(lengths), scale=1/sqrt(6): batch 1, head 0", w[1, 0])
    print()

    drop = (np.arange(lk) >= np.array(lengths)[:, None]).astype(np.float32)[:, None, None, :]
    tf32 = _softmax_tf_style(x, drop)
    with np.errstate(invalid="ignore", over="ignore"):
        tf16 = _softmax_tf_style(x.astype(np.float16), drop.astype(np.float16))
    w = masked_softmax(x, pad)
    print("3) batch 2 has no valid key at all (a fully masked row):")
    _show("   TF tutorial, x + mask * -1e9, float32: weight on padding", tf32[2, 0, :1])
    _show("   TF tutorial, float16 (-1e9 overflows to -inf, and 0 * -inf is NaN):", tf16[2, 0, :1])
    _show("   fastmask: a row with nothing to attend to is all zeros", w[2, 0, :1])
    print("\nSee `fastmask info` for backends and threads, and fastmask.explain(...) for routing.")
    return 0
