"""fastmask.dask: lazy masked softmax / attention on dask arrays, on a real cluster.

Every result is compared with the in-memory call on the same NumPy data. One
``LocalCluster`` (2 worker processes, 1 thread each) serves the whole module;
the same cases also run on dask's threaded scheduler.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("dask.array", reason="fastmask.dask needs dask: pip install 'fastmask[dask]'")
distributed = pytest.importorskip(
    "distributed", reason="fastmask.dask tests need distributed: pip install 'fastmask[dask]'"
)

import dask  # noqa: E402
import dask.array as da  # noqa: E402
from conftest import TOLERANCE  # noqa: E402

import fastmask as fm  # noqa: E402
import fastmask.dask as fmd  # noqa: E402
from fastmask.dask.workers import thread_scope  # noqa: E402

B, H, Q, N = 3, 2, 6, 20
KINDS = np.arange(N) % 3


def _every_third(b, h, q_idx, k_idx):
    return KINDS[k_idx] != 1 or (q_idx + h + b) % 2 == 0


def _tilt(s, b, h, q_idx, k_idx):
    return s + 0.125 * (q_idx - k_idx) + b - h


PREDICATE = fm.masks.predicate(_every_third)
SCORE = fm.masks.score(_tilt)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(params=["cluster", "threads"])
def scheduler(request):
    if request.param == "cluster":
        return request.getfixturevalue("client")
    return "threads"


def _compute(scheduler, *arrays):
    return dask.compute(*arrays, scheduler=scheduler)


def _logits(dtype=np.float32, shape=(B, H, Q, N), seed=0):
    x = np.random.default_rng(seed).standard_normal(shape) * 3
    return x.astype(dtype)


def _special(x):
    """NaN, kept +inf, all -inf: each in a row that is split across chunks."""
    x = x.copy()
    x[0, 0, 1, 15] = np.nan
    x[1, 1, 2, 3] = np.inf
    x[2, 0, 3, :] = -np.inf
    x[0, 1, 4, 9] = np.nan
    return x


def _check(y, ref):
    y = np.asarray(y)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    np.testing.assert_allclose(
        y.astype(np.float64), ref.astype(np.float64), equal_nan=True, **TOLERANCE[ref.dtype]
    )
    assert np.array_equal(np.isnan(y), np.isnan(ref)), "NaN rows differ"
    assert np.all(y[ref == 0] == 0), "positions that are 0 in memory must be exactly 0"


_DENSE = np.random.default_rng(7).random((B, 1, Q, N)) > 0.4
MASKS = {
    "none": None,
    "padding": fm.masks.padding([N, 0, 11]),  # the middle batch entry keeps nothing
    "padding-left": fm.masks.padding([5, N, 13], side="left"),
    "causal": fm.masks.causal(),
    "causal-bottom-right": fm.masks.causal(align="bottom-right"),
    "sliding-window": fm.masks.sliding_window(4),
    "band": fm.masks.sliding_window(5, causal=False, align="bottom-right"),
    "segments": fm.masks.segments([0, 0, 1, 1, 1, 2], [0] * 7 + [1] * 8 + [2] * 5),
    "segments-scattered": fm.masks.segments([0, 1, 0, 1, 2, 2], KINDS),
    "prefix-lm": fm.masks.prefix_lm([2, 5, 0]) & fm.masks.causal(10),
    "predicate": PREDICATE,
    "score": SCORE,
    "keep-array": _DENSE,
    "drop-strategy": fm.masks.drop(~_DENSE[:, :, :1]) & fm.masks.causal(8),
    "composed": fm.masks.causal(9) & fm.masks.padding([N, 3, 11]) & PREDICATE & SCORE,
}
#: rows whole in one block (chunks along batch / heads / queries) and rows split in 3+ chunks
CHUNKS = {"blocks": (1, 2, 4, N), "split": (2, 1, 3, 7), "split-5": (3, 2, 6, 4)}


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("layout", list(CHUNKS))
def test_every_mask_kind_matches_in_memory(kind, layout, scheduler):
    x = _special(_logits())
    mask = MASKS[kind]
    bias = np.linspace(-1, 1, N).astype(np.float32)
    ref = fm.masked_softmax(x, mask, bias=bias, scale=0.75)
    y = fmd.masked_softmax(da.from_array(x, chunks=CHUNKS[layout]), mask, bias=bias, scale=0.75)
    assert isinstance(y, da.Array) and y.chunks == da.from_array(x, chunks=CHUNKS[layout]).chunks
    (out,) = _compute(scheduler, y)
    _check(out, ref)


def test_fully_masked_and_nan_rows_in_split_rows(scheduler):
    x = _logits()
    x[0, 0, 0, 19] = np.nan  # NaN in the last chunk of a row
    x[0, 0, 1, 2] = np.nan  # NaN in the first chunk, at a masked position: ignored
    x[1, 0, 2, :] = -np.inf  # nothing finite to keep
    keep = np.ones(x.shape, bool)
    keep[0, 0, 1, :5] = False
    keep[2, 1, 5, :] = False  # nothing kept at all
    keep[2, 1, 4, :14] = False  # kept only in the last chunk
    ref = fm.masked_softmax(x, keep)
    assert np.isnan(ref[0, 0, 0]).all() and not np.isnan(ref[0, 0, 1]).any()
    (y,) = _compute(scheduler, fmd.masked_softmax(da.from_array(x, chunks=(2, 2, 3, 7)), keep))
    _check(y, ref)
    assert np.all(y[1, 0, 2] == 0) and np.all(y[2, 1, 5] == 0)
    np.testing.assert_allclose(y[2, 1, 4].sum(), 1, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float64])
@pytest.mark.parametrize("layout", ["blocks", "split"])
def test_dtypes(dtype, layout):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = _special(_logits(dtype))
    mask = fm.masks.causal(3) & fm.masks.padding([N, 0, 11])
    ref = fm.masked_softmax(x, mask, scale=0.5)
    y = fmd.masked_softmax(da.from_array(x, chunks=CHUNKS[layout]), mask, scale=0.5)
    _check(y.compute(scheduler="sync"), ref)


def test_dask_mask_and_bias_with_other_chunks(scheduler):
    x = _logits()
    rng = np.random.default_rng(3)
    keep = rng.random(x.shape) > 0.3
    bias = rng.standard_normal((B, 1, Q, N)).astype(np.float32)
    ref = fm.masked_softmax(x, keep, bias=bias)
    xd = da.from_array(x, chunks=(1, 1, 3, 7))
    keep_d = da.from_array(keep, chunks=(2, 2, 2, 10))  # rechunked to x's chunks
    bias_d = da.from_array(bias, chunks=(1, 1, 6, 5))
    (y,) = _compute(scheduler, fmd.masked_softmax(xd, keep_d, bias=bias_d))
    _check(y, ref)
    both = fmd.drop(~keep_d) & fm.masks.causal(7)
    (y2,) = _compute(scheduler, fmd.masked_softmax(xd, both, bias=bias_d))
    _check(y2, fm.masked_softmax(x, fm.masks.keep(keep) & fm.masks.causal(7), bias=bias))


@pytest.mark.parametrize("shape, chunks", [
    ((N,), (6,)),
    ((Q, N), (4, 7)),
    ((B, Q, N), (2, 4, 20)),
    ((B, 2, 3, Q, N), (2, 1, 2, 4, 7)),  # heads over two axes, chunked along both
])  # fmt: skip
def test_other_ranks(shape, chunks):
    x = _logits(shape=shape)

    @fm.masks.predicate
    def uses_every_index(b, h, q_idx, k_idx):
        return (b + 2 * h + q_idx + k_idx) % 4 != 0

    for mask in (fm.masks.causal(2), uses_every_index & fm.masks.sliding_window(9)):
        ref = fm.masked_softmax(x, mask)
        y = fmd.masked_softmax(da.from_array(x, chunks=chunks), mask).compute(scheduler="sync")
        _check(y, ref)


@pytest.mark.parametrize("chunks", [(3, 2, 6, 20), (1, 1, 2, 20), (1, 2, 3, 6)])
def test_other_axis_with_dense_mask(chunks):
    x = _logits()
    keep = np.random.default_rng(5).random((B, 1, Q, 1)) > 0.3  # broadcasts along the softmax axis
    ref = fm.masked_softmax(x, keep, axis=2)
    y = fmd.masked_softmax(da.from_array(x, chunks=chunks), keep, axis=2)
    _check(y.compute(scheduler="sync"), ref)
    # Regression: masks.keep / masks.drop with axis != -1 were refused ("does not
    # broadcast") where the in-memory call accepts them.
    full = np.random.default_rng(6).random(x.shape) > 0.3
    both = fm.masks.keep(keep) & fm.masks.keep(full[:1])
    for mask in (fm.masks.keep(keep), fm.masks.drop(full), both):
        ref = fm.masked_softmax(x, mask, axis=2)
        y = fmd.masked_softmax(da.from_array(x, chunks=chunks), mask, axis=2)
        _check(y.compute(scheduler="sync"), ref)


def test_errors_are_raised_when_the_graph_is_built():
    xd = da.zeros((2, 4, 4), chunks=2)
    with pytest.raises(TypeError, match="masks.keep"):
        fmd.masked_softmax(xd, np.ones((4, 4), np.float32))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fmd.masked_softmax(da.zeros((2, 4), dtype=int, chunks=2))
    with pytest.raises(ValueError, match="softmax axis last"):
        fmd.masked_softmax(xd, fm.masks.causal(), axis=1)
    with pytest.raises(ValueError, match="padding"):
        fmd.masked_softmax(xd, fm.masks.padding([1, 2, 3]))
    with pytest.raises(ValueError, match="does not broadcast"):
        fmd.masked_softmax(xd, bias=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="threads"):
        fmd.masked_softmax(xd, threads=0)


def test_a_failing_predicate_names_itself():
    @fm.masks.predicate
    def picky(b, h, q_idx, k_idx):
        if q_idx == 3 and k_idx == 5:
            raise ValueError("no")
        return True

    y = fmd.masked_softmax(da.zeros((2, 6, 8), chunks=(1, 2, 4)), picky)
    with pytest.raises(ValueError, match=r"picky.*q_idx=3, k_idx=5"):
        y.compute(scheduler="sync")


def test_forced_backend_and_threads_are_passed_to_tasks():
    x = _logits()
    xd = da.from_array(x, chunks=(1, 2, 3, 20))
    y = fmd.masked_softmax(xd, fm.masks.causal(), backend="numpy", threads=1)
    _check(y.compute(scheduler="threads"), fm.masked_softmax(x, fm.masks.causal()))
    with pytest.raises(ValueError, match="no-such-backend"):
        fmd.masked_softmax(xd, backend="no-such-backend").compute(scheduler="sync")


@pytest.mark.parametrize("shape, chunks", [
    ((0, 2, 3, 4), (1, 1, 2, 2)),
    ((2, 2, 0, 4), (1, 1, 1, 2)),
    ((2, 2, 3, 0), (1, 1, 2, 1)),
])  # fmt: skip
def test_empty_arrays(shape, chunks):
    x = np.zeros(shape, np.float32)
    y = fmd.masked_softmax(da.from_array(x, chunks=chunks), fm.masks.causal())
    assert y.compute(scheduler="sync").shape == shape


def test_numpy_inputs_are_one_chunk():
    x = _logits()
    y = fmd.masked_softmax(x, fm.masks.causal())
    assert y.numblocks == (1, 1, 1, 1)
    _check(y.compute(scheduler="sync"), fm.masked_softmax(x, fm.masks.causal()))


# --------------------------------------------------------------------------
# attention


def _qkv(hq=4, hk=2, lq=9, lk=11, d=8, dv=5, dtype=np.float32):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((2, hk, lk, d)).astype(dtype)
    v = rng.standard_normal((2, hk, lk, dv)).astype(dtype)
    return q, k, v


ATTENTION_MASKS = {
    "none": None,
    "causal-bottom-right": fm.masks.causal(align="bottom-right"),
    "padding-window": fm.masks.padding([5, 11]) & fm.masks.sliding_window(4, causal=False),
    "keep-array": np.random.default_rng(2).random((2, 1, 9, 11)) > 0.3,
}


@pytest.mark.parametrize("kind", list(ATTENTION_MASKS))
@pytest.mark.parametrize("q_chunks", [(1, 4, 9, 8), (2, 1, 4, 8), (1, 3, 5, 8)])
@pytest.mark.parametrize("keys", ["whole", "split"])
def test_attention_matches_in_memory(kind, q_chunks, keys, scheduler):
    q, k, v = _qkv()  # grouped-query: 4 query heads on 2 kv heads
    mask = ATTENTION_MASKS[kind]
    ref_o, ref_w = fm.attention(q, k, v, mask, return_weights=True)
    qd = da.from_array(q, chunks=q_chunks)
    lk = 11 if keys == "whole" else 4  # split: 3 chunks of keys (4 + 4 + 3)
    kd, vd = da.from_array(k, chunks=(1, 1, lk, 8)), da.from_array(v, chunks=(2, 2, 6, 5))
    o = fmd.attention(qd, kd, vd, mask)
    o2, w2 = fmd.attention(qd, kd, vd, mask, return_weights=True)
    out, out2, weights = _compute(scheduler, o, o2, w2)
    tol = {"atol": 2e-6, "rtol": 1e-5}
    np.testing.assert_allclose(out, ref_o, **tol)
    np.testing.assert_allclose(out2, ref_o, **tol)
    np.testing.assert_allclose(weights, ref_w, **tol)


def test_attention_with_dask_bias_predicate_and_broadcast_kv():
    q, k, v = _qkv(hq=3, hk=1)
    bias = np.random.default_rng(4).standard_normal((2, 3, 9, 11)).astype(np.float32)

    @fm.masks.predicate
    def stripes(b, h, q_idx, k_idx):
        return (k_idx + b + h) % 3 != 0 or k_idx == q_idx

    keep = stripes.to_dense((2, 3, 9, 11))
    ref = fm.attention(q, k, v, keep, bias=bias, scale=0.3)
    o = fmd.attention(
        da.from_array(q, chunks=(1, 2, 4, 8)), k, v, stripes,
        bias=da.from_array(bias, chunks=(2, 3, 3, 11)), scale=0.3,
    )  # fmt: skip
    np.testing.assert_allclose(o.compute(scheduler="threads"), ref, atol=2e-6, rtol=1e-5)


def test_attention_split_keys_fully_masked_rows_and_nan():
    q, k, v = _qkv(hq=2, hk=2)
    k[1, 0, 9] = np.nan  # key 9 of batch 1 / head 0: a NaN score in every row that keeps it
    mask = fm.masks.padding([0, 11]) & fm.masks.causal(align="bottom-right")
    ref = fm.attention(q, k, v, mask)
    o = fmd.attention(q, da.from_array(k, chunks=(1, 2, 3, 8)), v, mask)
    out = o.compute(scheduler="threads")
    assert np.all(out[0] == 0)  # batch 0 keeps no key
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5, equal_nan=True)


def test_attention_rejects_score_functions():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="score"):
        fmd.attention(da.from_array(q), k, v, SCORE)


# --------------------------------------------------------------------------
# threads inside workers


def _threads_in_a_task():
    """What a fastmask.dask task would use, and fastmask's setting while it runs."""
    n = fmd.task_threads()
    with thread_scope(n):
        return n, fm.get_num_threads()


def test_process_workers_run_one_fastmask_thread_per_task(client):
    # the nanny starts workers with OMP_NUM_THREADS=1 and fastmask follows it
    pinned = os.environ.get("FASTMASK_NUM_THREADS")  # inherited by the workers: it wins
    expected = (int(pinned), int(pinned)) if pinned else (1, 1)
    assert client.submit(_threads_in_a_task, pure=False).result() == expected
    assert client.submit(fmd.task_threads, 3, pure=False).result() == 3


def test_threaded_worker_splits_cores_between_its_threads(monkeypatch):
    monkeypatch.delenv("FASTMASK_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = fm.threads.available_cpus()
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False,
            dashboard_address=":0", silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):  # fmt: skip
        before = fm.get_num_threads(), fm.threads.num_threads_setting()
        n, during = c.submit(_threads_in_a_task, pure=False).result()
        assert n == max(1, cores // 2) and during == n
        # the setting comes back after the task (the default stays the default)
        assert (fm.get_num_threads(), fm.threads.num_threads_setting()) == before
        x = _logits()
        y = fmd.masked_softmax(da.from_array(x, chunks=(1, 1, 3, 7)), fm.masks.causal())
        _check(y.compute(scheduler=c), fm.masked_softmax(x, fm.masks.causal()))


def test_threaded_scheduler_splits_cores_between_pool_threads(monkeypatch):
    monkeypatch.delenv("FASTMASK_NUM_THREADS", raising=False)
    cores = fm.threads.available_cpus()
    seen = da.zeros(4, chunks=1).map_blocks(
        lambda b: np.full(b.shape, fmd.task_threads()), dtype=int
    )  # fmt: skip
    assert set(seen.compute(scheduler="threads", num_workers=2).tolist()) == {max(1, cores // 2)}
    assert fmd.task_threads() is None  # the calling thread: fastmask's own setting
    assert fmd.task_threads(5) == 5


def test_fastmask_num_threads_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("FASTMASK_NUM_THREADS", "3")
    seen = da.zeros(2, chunks=1).map_blocks(
        lambda b: np.full(b.shape, fmd.task_threads()), dtype=int
    )  # fmt: skip
    assert seen.compute(scheduler="threads").tolist() == [3, 3]
    assert fmd.task_threads() == 3 and fmd.task_threads(2) == 2


def test_worker_environment_sets_fastmask_threads():
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, dashboard_address=":0",
            silence_logs=logging.ERROR, env={"FASTMASK_NUM_THREADS": "2"},
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):  # fmt: skip
        assert c.submit(_threads_in_a_task, pure=False).result() == (2, 2)


# --------------------------------------------------------------------------
# packaging


def test_importing_fastmask_does_not_import_dask():
    code = "import sys, fastmask; assert 'dask' not in sys.modules, 'dask was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_of_the_subpackage():
    for name in fmd.__all__:
        assert getattr(fmd, name).__module__.startswith("fastmask.dask"), name
    assert fmd.keep(da.ones(3, dtype=bool)).plan((2, 3)).keep.tolist() == [True] * 3
