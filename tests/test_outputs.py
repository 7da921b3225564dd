"""Large outputs come from a small pool of recycled blocks: never shared while in use."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastmask as fm
from fastmask import outputs
from fastmask.reference import masked_softmax_reference

SHAPE = (2, 4, 256, 256)  # 2 MiB of float32: pooled


@pytest.fixture(autouse=True)
def fresh_pool():
    outputs.clear()
    yield
    outputs.clear()


def test_a_dropped_output_is_handed_out_again_and_a_live_one_never():
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    y = fm.masked_softmax(x, fm.masks.causal())
    first = y.ctypes.data
    assert y.ctypes.data % 64 == 0 and y.flags.c_contiguous and y.flags.writeable
    held = [y[0, 1], np.asarray(y).reshape(-1)]  # views keep the block in use
    del y
    z = fm.masked_softmax(x, fm.masks.causal())
    assert not np.shares_memory(z, held[0])
    del held, z
    w = fm.masked_softmax(x, fm.masks.causal())
    assert w.ctypes.data == first or outputs.pooled_bytes()[1] > 0  # a free block is reused
    np.testing.assert_allclose(
        w, masked_softmax_reference(x, keep=fm.masks.causal().to_dense(SHAPE)), atol=1e-6
    )


def test_a_torch_tensor_made_from_an_output_keeps_it_in_use():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    t = torch.from_numpy(fm.masked_softmax(x))
    kept = t.clone()
    for _ in range(3):
        fm.masked_softmax(-x)  # results dropped at once: blocks recycled among these
    assert torch.equal(t, kept)


def test_small_outputs_are_plain_arrays():
    y = fm.masked_softmax(np.zeros((2, 3), np.float32))
    assert y.flags.owndata and outputs.pooled_bytes() == (0, 0)


def test_concurrent_calls_never_share_an_output():
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(4)]
    want = [fm.masked_softmax(x, backend="numpy") for x in xs]
    errors = []

    def worker(t):
        try:
            for i in range(30):
                k = (t + i) % 4
                y = fm.masked_softmax(xs[k])
                np.testing.assert_allclose(y, want[k], atol=1e-6)
        except Exception as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    want.clear()  # (pooled outputs too)
    used, free = outputs.pooled_bytes()
    assert used == 0 and free <= outputs._max_free_bytes
    assert len(outputs._blocks) <= outputs.MAX_BLOCKS


def test_the_pool_keeps_at_most_its_limit_of_free_memory():
    xs = [np.zeros((n, 4, 256, 256), np.float32) for n in range(1, 12)]  # 11 sizes
    live = [fm.masked_softmax(x) for x in xs]  # more than MAX_BLOCKS at once
    assert len(outputs._blocks) <= outputs.MAX_BLOCKS
    del live
    fm.masked_softmax(xs[0])
    assert outputs.pooled_bytes()[1] <= outputs._max_free_bytes


def test_the_pool_can_be_turned_off():
    code = (
        "import numpy as np, fastmask as fm; from fastmask import outputs; "
        "y = fm.masked_softmax(np.zeros((2, 4, 256, 256), np.float32)); "
        "print(outputs.pooled_bytes(), y.ctypes.data % 64)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**os.environ, "FASTMASK_OUTPUT_POOL_MB": "0"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(0, 0) 0"  # nothing kept; still line-aligned


def test_large_outputs_start_on_a_cache_line_pooled_or_not():
    for shape in [(2, 4, 256, 256), (3, 1, 1, 1 << 22)]:  # 2 MiB; 48 MiB
        for _ in range(3):
            assert outputs.empty(shape, np.float32).ctypes.data % 64 == 0
    big = outputs.empty((outputs._max_free_bytes // 4 + 16,), np.float32)  # over the cap
    assert big.ctypes.data % 64 == 0 and outputs.pooled_bytes()[0] < big.nbytes
