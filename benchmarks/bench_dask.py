"""fastmask.dask against in-memory fastmask on the same machine (a report, not a test).

A padded float32 batch, in memory and as a dask array split into chunks along
the batch axis on a ``LocalCluster`` of single-threaded worker processes. The
dask logits are generated on the workers (``dask.array.random``) and persisted
before timing, and each result is persisted on the workers (never gathered), so
the figure is fastmask's work plus dask's scheduling, not data transfer.

    python benchmarks/bench_dask.py                      # (64, 12, 512, 512), 8 chunks, 2 workers
    python benchmarks/bench_dask.py --shape 8,12,256,256 --repeats 3   # a quick look

The two are timed alternately (``--repeats`` pairs, after one warm-up run of
each), so that a machine whose load changes meanwhile affects both alike; the
report gives the best time of each and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="64,12,512,512", help="B,H,Lq,Lk (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=8, help="chunks along the batch axis")
    p.add_argument("--workers", type=int, default=2, help="worker processes, 1 thread each")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import dask.array as da
    import numpy as np
    from distributed import Client, LocalCluster, futures_of, wait

    import fastmask as fm
    import fastmask.dask as fmd

    shape = tuple(int(s) for s in args.shape.split(","))
    b, _, _, n = shape
    lengths = np.random.default_rng(1).integers(n // 4, n + 1, size=b)
    mask = fm.masks.padding(lengths)
    gib = np.prod(shape) * 4 / 2**30

    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True,
            dashboard_address=":0", silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        # dask: chunks along the batch, generated and kept on the workers
        chunks = (-(-b // args.chunks), *shape[1:])
        xd = da.random.default_rng(0).standard_normal(shape, chunks=chunks, dtype=np.float32)
        xd = xd.persist()
        wait(xd)
        # in memory: the same shape, all of fastmask's threads on one array
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)

        def forgotten(keys: list, dask_scheduler=None) -> bool:
            return not any(k in dask_scheduler.tasks for k in keys)

        def in_memory() -> float:
            t0 = time.perf_counter()
            y = fm.masked_softmax(x, mask)
            t = time.perf_counter() - t0
            del y
            return t

        def on_dask() -> float:
            t0 = time.perf_counter()
            y = fmd.masked_softmax(xd, mask).persist()
            wait(y)
            t = time.perf_counter() - t0
            keys = [f.key for f in futures_of(y)]
            del y  # released on the workers: the next run computes again
            while not client.run_on_scheduler(forgotten, keys):
                time.sleep(0.01)
            return t

        in_memory(), on_dask()  # warm-up: routing, page faults, worker imports
        pairs = [(in_memory(), on_dask()) for _ in range(args.repeats)]

    t_mem = min(m for m, _ in pairs)
    t_dask = min(d for _, d in pairs)
    threads = fm.get_num_threads()
    result = {
        "shape": shape,
        "gib": round(float(gib), 3),
        "in_memory_s": t_mem,
        "in_memory_threads": threads,
        "dask_s": t_dask,
        "chunks": args.chunks,
        "workers": args.workers,
        "ratio": t_dask / t_mem,
        "pairs_ms": [(round(m * 1e3, 1), round(d * 1e3, 1)) for m, d in pairs],
    }
    print(
        f"masked_softmax {shape} float32 ({gib:.2f} GiB), padding mask\n"
        f"  in memory   : {t_mem * 1e3:8.1f} ms  ({threads} fastmask threads)\n"
        f"  dask        : {t_dask * 1e3:8.1f} ms  ({args.chunks} chunks, LocalCluster of "
        f"{args.workers} single-threaded worker processes)\n"
        f"  dask / mem  : {t_dask / t_mem:8.2f}x   (best of {args.repeats} each; "
        f"pairs in ms: {result['pairs_ms']})"
    )
    return result


if __name__ == "__main__":
    main()
