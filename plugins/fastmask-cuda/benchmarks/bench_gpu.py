"""fastmask-cuda against PyTorch and against a plain copy, on one GPU.

For each workload it times, on the same device tensors:

- ``fastmask``: ``fm.masked_softmax(x, mask, out=out)`` (x and out are torch CUDA
  tensors, passed through ``__cuda_array_interface__``; structured masks are
  never materialised);
- ``torch``: ``torch.softmax(x.masked_fill(~keep, -inf), dim=-1)`` with the mask
  materialised as a bool tensor (the common PyTorch idiom; it reads and writes
  the logits twice and gives NaN rows where nothing is kept);
- ``copy``: ``out.copy_(x)``, a device-to-device copy of the same bytes: the
  memory-traffic floor of any softmax that reads x once and writes it once.

and prints the times and the ratios fastmask/torch and fastmask/copy (lower is
better; 1.0 against ``copy`` would be bandwidth-bound perfection). Times are
CUDA-event times per call, averaged over back-to-back calls after a warm-up that
also compiles the kernels, so Python launch overhead counts when it dominates.

Usage::

    python plugins/fastmask-cuda/benchmarks/bench_gpu.py [--quick] [--repeat N]

Needs an NVIDIA GPU, numba-cuda and PyTorch built with CUDA; without them it
exits with a message saying which is missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def _require_gpu():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise SystemExit("bench_gpu: NUMBA_ENABLE_CUDASIM is set; the simulator cannot be timed.")
    from fastmask_cuda import memory

    ok, note = memory.probe()
    if not ok:
        raise SystemExit(f"bench_gpu: no usable GPU here ({note}); nothing to benchmark.")
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_gpu: PyTorch is not installed (pip install torch).") from None
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: this PyTorch build has no CUDA (torch.cuda.is_available()).")
    return torch, note


def _workloads(quick: bool):
    import fastmask as fm

    # name, (B, H, Lq, Lk), dtype name, mask factory (from the shape)
    loads = [
        ("causal prefill f16", (4, 16, 1024, 1024), "float16", lambda s: fm.masks.causal()),
        ("padding f16", (8, 16, 512, 512), "float16",
         lambda s: fm.masks.padding([s[3] - 37 * i for i in range(s[0])])),
        ("sliding window f32", (2, 16, 2048, 2048), "float32",
         lambda s: fm.masks.sliding_window(256)),
        ("decode, long KV f16", (32, 32, 1, 8192), "float16",
         lambda s: fm.masks.padding([s[3] - 100 * i for i in range(s[0])])),
        ("no mask f32", (8, 16, 512, 512), "float32", lambda s: None),
    ]  # fmt: skip
    if quick:
        loads = [(n, (max(1, s[0] // 4), *s[1:]), d, m) for n, s, d, m in loads]
    return loads


def _time(torch, fn, repeat: int, inner: int) -> float:
    """Median over ``repeat`` of the mean CUDA-event time of ``inner`` back-to-back calls (ms)."""
    samples = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions (median)")
    parser.add_argument("--inner", type=int, default=10, help="calls per repetition")
    args = parser.parse_args(argv)

    torch, device_note = _require_gpu()
    import numpy as np

    import fastmask as fm
    import fastmask_cuda.plugin

    if "cuda" not in fm.plugins.backends():
        fm.plugins.register(fastmask_cuda.plugin)

    print(f"device: {device_note}; torch {torch.__version__}; fastmask {fm.__version__}")
    header = (f"{'workload':<22} {'shape':<22} {'fastmask ms':>11} {'torch ms':>9} "
              f"{'copy ms':>8} {'fm/torch':>8} {'fm/copy':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, shape, dtype_name, make_mask in _workloads(args.quick):
        dtype = getattr(torch, dtype_name)
        x = torch.randn(shape, device="cuda", dtype=dtype, generator=gen) * 4
        out = torch.empty_like(x)
        mask = make_mask(shape)
        if mask is None:
            keep = torch.ones(shape[-2:], device="cuda", dtype=torch.bool)
        else:
            # Shared by the heads, as PyTorch users pass it: (B, 1, Lq, Lk).
            dense = mask.to_dense((shape[0], 1, *shape[2:]))
            keep = torch.from_numpy(np.ascontiguousarray(dense)).cuda()

        def run_fastmask(x=x, out=out, mask=mask):
            fm.masked_softmax(x, mask, out=out)

        def run_torch(x=x, keep=keep):
            torch.softmax(x.masked_fill(~keep, float("-inf")), dim=-1)

        def run_copy(x=x, out=out):
            out.copy_(x)

        for fn in (run_fastmask, run_torch, run_copy):  # warm-up (JIT compile, allocator)
            fn()
        torch.cuda.synchronize()
        t_fm = _time(torch, run_fastmask, args.repeat, args.inner)
        t_torch = _time(torch, run_torch, args.repeat, args.inner)
        t_copy = _time(torch, run_copy, args.repeat, args.inner)
        print(f"{name:<22} {shape!s:<22} {t_fm:11.3f} {t_torch:9.3f} {t_copy:8.3f} "
              f"{t_fm / t_torch:8.2f} {t_fm / t_copy:8.2f}")  # fmt: skip
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
