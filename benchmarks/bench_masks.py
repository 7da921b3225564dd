"""Benchmarks of mask strategies: skipped work, and user predicates against built-ins.

Run ``python -m benchmarks.bench_masks`` from the repository root (``--quick``
for smaller shapes, ``--threads N``). Two claims are measured, each side by
side in one process, with the implementations timed in alternation (median
of the rounds, after warm-up, JIT compilation included in the warm-up):

1. ``sliding_window(256)`` on ``(1, 16, 4096, 4096)`` float32 costs less than
   copying the input once (``np.copyto`` into a preallocated array): the
   kernels read only the ``256`` kept logits of each row and write the
   skipped positions as zeros without reading them. Timed on the ``numba``
   and ``cython`` backends, both writing into a preallocated ``out``.
2. A user predicate reproducing ``causal()`` (``k_idx <= q_idx``) runs within
   2x of the built-in ``causal()`` on ``(1, 16, 2048, 2048)`` float32 (numba):
   the predicate is evaluated on every key of every row, the built-in one
   only bounds the loop. Also timed: the predicate under the built-in causal
   interval, and an ALiBi score function against the same bias passed as an
   array.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

import fastmask as fm

__all__ = ["bench_predicate_vs_builtin", "bench_sliding_window_vs_copy", "main"]


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation after two warm-ups."""
    for fn in fns.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def _report(title: str, times: dict[str, float], base: str) -> None:
    print(title)
    for name, t in times.items():
        print(f"  {name:<44} {t * 1e3:9.2f} ms   {t / times[base]:6.2f} x {base}")


def bench_sliding_window_vs_copy(shape=(1, 16, 4096, 4096), window=256, rounds=7):
    """Times of ``sliding_window(window)`` per backend and of one ``np.copyto`` of ``x``."""
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    out = np.empty_like(x)
    mask = fm.masks.sliding_window(window)
    fns: dict[str, Callable[[], object]] = {"copy (np.copyto)": lambda: np.copyto(out, x)}
    for name in ("numba", "cython"):
        ok, _ = fm.plugins.backends()[name].status()
        if ok:
            fns[f"sliding_window({window}) [{name}]"] = lambda name=name: fm.masked_softmax(
                x, mask, out=out, backend=name
            )
    return _interleaved(fns, rounds)


def bench_predicate_vs_builtin(shape=(1, 16, 2048, 2048), rounds=7):
    """Times of ``causal()`` against a predicate doing the same, and ALiBi as score vs bias."""
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    out = np.empty_like(x)
    heads = int(np.prod(shape[1:-2]))
    slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)

    @fm.masks.predicate
    def causal_predicate(b, h, q_idx, k_idx):
        return k_idx <= q_idx

    @fm.masks.score
    def alibi(score, b, h, q_idx, k_idx):
        return score + slopes[h] * (k_idx - q_idx)

    q, n = shape[-2], shape[-1]
    bias = (slopes[:, None, None] * (np.arange(n)[None, :] - np.arange(q)[:, None])).astype(
        np.float32
    )[None]
    causal = fm.masks.causal()

    def run(mask, **kw):
        return lambda: fm.masked_softmax(x, mask, out=out, backend="numba", **kw)

    fns = {
        "causal() [built-in]": run(causal),
        "predicate(k_idx <= q_idx)": run(causal_predicate),
        "causal() & predicate(k_idx <= q_idx)": run(causal & causal_predicate),
        "causal() & score(alibi)": run(causal & alibi),
        "causal(), bias=alibi array": run(causal, bias=bias),
    }
    return _interleaved(fns, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer rounds")
    parser.add_argument("--threads", type=int, help="fastmask thread count")
    args = parser.parse_args(argv)
    if args.threads:
        fm.set_num_threads(args.threads)
    rounds = 3 if args.quick else 7
    sw_shape = (1, 4, 2048, 2048) if args.quick else (1, 16, 4096, 4096)
    pred_shape = (1, 4, 1024, 1024) if args.quick else (1, 16, 2048, 2048)
    print(f"fastmask {fm.__version__}, {fm.get_num_threads()} thread(s), float32, medians")
    times = bench_sliding_window_vs_copy(sw_shape, 256, rounds)
    _report(f"sliding_window(256) on {sw_shape}, out= preallocated", times, "copy (np.copyto)")
    times = bench_predicate_vs_builtin(pred_shape, rounds)
    _report(f"user functions on {pred_shape} (numba)", times, "causal() [built-in]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
