"""fastmask-cuda against PyTorch and against a plain copy, on one GPU.

Masked softmax (``--op softmax``): for each workload it times, on the same
device tensors,

- ``fastmask``: ``fm.masked_softmax(x, mask, out=out)`` (x and out are torch CUDA
  tensors, passed through ``__cuda_array_interface__``; structured masks are
  never materialised);
- ``torch``: ``torch.softmax(x.masked_fill(~keep, -inf), dim=-1)`` with the mask
  materialised as a bool tensor (the common PyTorch idiom; it reads and writes
  the logits twice and gives NaN rows where nothing is kept);
- ``copy``: ``out.copy_(x)``, a device-to-device copy of the same bytes: the
  memory-traffic floor of any softmax that reads x once and writes it once.

and prints the times and the ratios fastmask/torch and fastmask/copy (lower is
better; 1.0 against ``copy`` would be bandwidth-bound perfection).

Attention (``--op attention``): ``fm.attention(q, k, v, mask)`` (the tiled
kernel with an online softmax; it allocates its output, a numba
``DeviceNDArray``, per call) against

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with
  ``is_causal=True`` for causal masks, a boolean ``attn_mask`` (True = keep,
  ``(B, 1, Lq, Lk)``) for the others, ``enable_gqa=True`` for grouped queries
  (flash / memory-efficient / cuDNN kernels, tensor cores);
- ``eager``: ``softmax((q @ k^T * scale).masked_fill(~keep, -inf)) @ v`` in
  PyTorch, the scores materialised;

and prints the ratios fastmask/sdpa and fastmask/eager, and the largest
difference between fastmask's output and SDPA's over the rows SDPA computes
(a correctness check of the kernel on real hardware).

Times are CUDA-event times per call, averaged over back-to-back calls after a
warm-up that also compiles the kernels, so Python launch overhead counts when
it dominates.

Usage::

    python plugins/fastmask-cuda/benchmarks/bench_gpu.py [--op softmax|attention|all]
                                                          [--quick] [--repeat N] [--inner N]

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


def _attention_workloads(quick: bool):
    import fastmask as fm

    # name, (B, Hq, Hk, Lq, Lk, D), dtype name, mask factory (from the shape), causal
    loads = [
        ("causal prefill f16", (4, 16, 16, 1024, 1024, 64), "float16",
         lambda s: fm.masks.causal(), True),
        ("padding f16", (8, 16, 16, 512, 512, 64), "float16",
         lambda s: fm.masks.padding([s[4] - 37 * i for i in range(s[0])]), False),
        ("sliding window f32", (2, 16, 16, 2048, 2048, 64), "float32",
         lambda s: fm.masks.sliding_window(256), False),
        ("GQA decode f16", (32, 32, 8, 1, 4096, 128), "float16",
         lambda s: fm.masks.padding([s[4] - 100 * i for i in range(s[0])]), False),
        ("no mask f32", (8, 16, 16, 512, 512, 64), "float32", lambda s: None, False),
    ]  # fmt: skip
    if quick:
        loads = [(n, (max(1, s[0] // 4), *s[1:]), d, m, c) for n, s, d, m, c in loads]
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


def _bench_softmax(torch, args) -> None:
    import numpy as np

    import fastmask as fm

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


def _bench_attention(torch, args) -> None:
    import numpy as np

    import fastmask as fm

    sdpa = torch.nn.functional.scaled_dot_product_attention
    header = (f"{'workload':<20} {'B,Hq,Hk,Lq,Lk,D':<28} {'fastmask ms':>11} {'sdpa ms':>8} "
              f"{'eager ms':>8} {'fm/sdpa':>7} {'fm/eager':>8} {'max|fm-sdpa|':>12}")  # fmt: skip
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, shape, dtype_name, make_mask, causal in _attention_workloads(args.quick):
        b, hq, hk, lq, lk, d = shape
        dtype = getattr(torch, dtype_name)
        q = torch.randn((b, hq, lq, d), device="cuda", dtype=dtype, generator=gen)
        k = torch.randn((b, hk, lk, d), device="cuda", dtype=dtype, generator=gen)
        v = torch.randn((b, hk, lk, d), device="cuda", dtype=dtype, generator=gen)
        mask = make_mask(shape)
        keep = None
        if mask is not None:
            dense = mask.to_dense((b, 1, lq, lk))
            keep = torch.from_numpy(np.array(dense)).cuda()
        gqa = {"enable_gqa": True} if hq != hk else {}
        scale = 1.0 / d**0.5

        def run_fastmask(q=q, k=k, v=v, mask=mask):
            return fm.attention(q, k, v, mask)

        def run_sdpa(q=q, k=k, v=v, keep=keep, causal=causal, gqa=gqa):
            if causal:
                return sdpa(q, k, v, is_causal=True, **gqa)
            return sdpa(q, k, v, attn_mask=keep, **gqa)

        def run_eager(q=q, k=k, v=v, keep=keep, g=hq // hk, scale=scale):
            kk = k.repeat_interleave(g, dim=1) if g > 1 else k
            vv = v.repeat_interleave(g, dim=1) if g > 1 else v
            s = (q @ kk.transpose(-1, -2)) * scale
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            return torch.softmax(s, dim=-1) @ vv

        try:
            ref = run_sdpa()
        except (RuntimeError, TypeError) as exc:  # e.g. a torch without enable_gqa
            print(f"{name:<20} skipped: torch SDPA cannot run it ({exc})")
            continue
        got = torch.as_tensor(run_fastmask(), device="cuda")
        diff = (got.float() - ref.float()).abs()
        diff[~torch.isfinite(ref)] = 0  # rows that SDPA leaves NaN (nothing kept)
        max_diff = float(diff.max()) if diff.numel() else 0.0
        for fn in (run_fastmask, run_sdpa, run_eager):  # warm-up (JIT compile, allocator)
            fn()
        torch.cuda.synchronize()
        t_fm = _time(torch, run_fastmask, args.repeat, args.inner)
        t_sdpa = _time(torch, run_sdpa, args.repeat, args.inner)
        t_eager = _time(torch, run_eager, args.repeat, args.inner)
        dims = ",".join(str(x) for x in shape)
        print(f"{name:<20} {dims:<28} {t_fm:11.3f} {t_sdpa:8.3f} {t_eager:8.3f} "
              f"{t_fm / t_sdpa:7.2f} {t_fm / t_eager:8.2f} {max_diff:12.2e}")  # fmt: skip
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--op", choices=("softmax", "attention", "all"), default="all", help="what to time"
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions (median)")
    parser.add_argument("--inner", type=int, default=10, help="calls per repetition")
    args = parser.parse_args(argv)

    torch, device_note = _require_gpu()
    import fastmask as fm
    import fastmask_cuda.plugin

    if "cuda" not in fm.plugins.backends():
        fm.plugins.register(fastmask_cuda.plugin)

    print(f"device: {device_note}; torch {torch.__version__}; fastmask {fm.__version__}")
    if args.op in ("softmax", "all"):
        print("\nmasked softmax")
        _bench_softmax(torch, args)
    if args.op in ("attention", "all"):
        print("\nattention")
        _bench_attention(torch, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
