"""The numba kernels give the same bits whatever the memory layout, thread count or process.

Regression: pass 2 summed ``exp(z - m)`` as a reassociated reduction inside its
exp loop. LLVM guards that loop with a runtime check of its pointers (for some
pairs only "is the output less than 256 bytes past the input") and falls back
to a scalar loop that sums in another order. Where the output row, or a
per-thread scratch row (gathered ``x``, 16-bit ``x`` in float32, the weights
buffer), happened to lie in memory thus changed the last bit of a row: from one
call to the next, between thread counts (each chunk allocates its own scratch)
and between processes. The sum is now :func:`fastmask.kernels.numba_exp.lane_sum`,
whose order depends on the row length only.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import threaded_cases

from fastmask.kernels import numba_exp as ne
from fastmask.kernels import numba_softmax as ns

# Short rows: a scratch row then spans less than the 256 bytes of LLVM's check.
LENGTHS = (9, 17, 33, 40, 63)


def _kernel(x, out, keep=None, bias=None, bounds=None, nthreads=1):
    ns.masked_softmax_4d(x, out, 1.0, keep, bias, bounds, 0, nthreads)
    return out


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_output_placement_does_not_change_the_bits(dtype, with_bias):
    """An output row just past its input row (one buffer) against a separate output."""
    rng = np.random.default_rng(3)
    for n in LENGTHS:
        for _ in range(24):
            x0 = (rng.standard_normal((1, 1, 1, n)) * 3).astype(dtype)
            bias = rng.standard_normal((1, 1, 1, n)).astype(dtype) if with_bias else None
            expected = _bits(_kernel(x0, np.empty_like(x0), bias=bias))
            for gap in (0, 1, 8, 64):
                buf = np.zeros(2 * n + gap, dtype)
                x = buf[:n].reshape(x0.shape)
                x[...] = x0
                out = buf[n + gap :].reshape(x0.shape)  # not overlapping x
                assert _bits(_kernel(x, out, bias=bias)) == expected, (n, gap)


def _strided_cases():
    """Inputs that use the per-thread scratch rows, plus the concurrency tests' cases."""
    rng = np.random.default_rng(7)
    cases = []
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        for n in LENGTHS:
            base = (rng.standard_normal((4, 8, 64, 2 * n)) * 3).astype(dtype)
            keep = rng.random((4, 1, 1, n)) < 0.8 if n % 2 else None
            cases.append((base[..., ::2], keep))  # gathered x
    return cases + threaded_cases()


def _run_case(x, mask, nthreads, strided_out):
    """The kernel on one case, as the backend calls it (dense keep or bounds)."""
    from fastmask import masks
    from fastmask.request import _plan

    keep = bounds = None
    if isinstance(mask, masks.MaskStrategy):  # kept ranges, as the backend gets them
        plan, bounds = _plan(mask, x.shape)
        assert plan.keep is None
    elif mask is not None:
        keep = np.broadcast_to(mask, x.shape)
    if strided_out:
        out = np.empty((*x.shape[:3], 2 * x.shape[3]), x.dtype)[..., ::2]  # scratch weights
    else:
        out = np.empty(x.shape, x.dtype)
    _kernel(x, out, keep=keep, bounds=bounds, nthreads=nthreads)
    return out


def _digests(nthreads_list=(1, 2)) -> list[str]:
    out = []
    for x, mask in _strided_cases():
        for nthreads in nthreads_list:
            for strided_out in (False, True):
                y = _run_case(x, mask, nthreads, strided_out)
                out.append(hashlib.sha256(_bits(y)).hexdigest())
    return out


def test_repeated_calls_and_thread_counts_give_the_same_bits():
    rng = np.random.default_rng(5)
    junk = []
    for i, (x, mask) in enumerate(_strided_cases()):
        expected = _bits(_run_case(x, mask, 1, False))
        for call in range(8):
            # stir the heap (small blocks held and freed), so the scratch rows land elsewhere
            junk += [np.empty(int(k), np.uint8) for k in rng.integers(8, 300, call % 4)]
            while len(junk) > 20:
                junk.pop(int(rng.integers(len(junk))))
            nthreads = 1 + call % 2
            y = _run_case(x, mask, nthreads, strided_out=call % 3 == 2)
            assert _bits(y) == expected, (i, call, nthreads)


def test_streaming_stores_give_the_same_bits(monkeypatch):
    """Streamed outputs go through the weights scratch row too."""
    cases = _strided_cases()[: 4 * len(LENGTHS)]
    expected = [_bits(_run_case(x, m, 1, False)) for x, m in cases]
    monkeypatch.setattr(ns, "STREAM_MIN_BYTES", 0)
    for (x, m), e in zip(cases, expected, strict=True):
        for nthreads in (1, 2):
            assert _bits(_run_case(x, m, nthreads, False)) == e


def test_a_fresh_process_gives_the_same_bits():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        sys.path[:0] = {path!r}
        junk = [np.empty(n, np.uint8) for n in range(8, 4000, 24)]  # another heap
        import test_numba_determinism as t
        print(" ".join(t._digests((2, 1))))
        """
    ).format(path=[str(Path(__file__).resolve().parent)])
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    child = proc.stdout.split()
    parent = _digests((2, 1))
    assert child == parent


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lane_sum_matches_its_definition_at_any_address(dtype):
    """The jitted lane_sum equals the pure-Python model bit for bit, at any offset."""
    import numba

    ns._install()

    @numba.njit
    def jitted(a, start, n):
        return ne.lane_sum(ne.address(a, start), n)

    def model(vals, lanes):
        acc = np.zeros(lanes, vals.dtype)
        for i in range(0, vals.size, lanes):  # lane l adds vals[i + l], in order
            block = vals[i : i + lanes]
            acc[: block.size] += block
        while acc.size > 1:  # then a fixed pairwise tree
            acc = acc[: acc.size // 2] + acc[acc.size // 2 :]
        return acc[0]

    rng = np.random.default_rng(11)
    lanes = ne.SUM_LANES[np.dtype(dtype).name]
    for n in (0, 1, 5, lanes - 1, lanes, lanes + 1, 3 * lanes + 7, 1000):
        vals = (rng.random(n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype)
        want = model(vals, lanes)
        for start in (0, 1, 3, 16, 17):
            a = np.zeros(start + n + 64, dtype)
            a[start : start + n] = vals
            got = jitted(a, start, n)
            assert np.asarray(got, dtype).tobytes() == np.asarray(want, dtype).tobytes()
