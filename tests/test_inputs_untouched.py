"""No input is ever modified unless it is the ``out`` argument, for every op.

Every call first gets writable inputs seeded with NaNs that carry payloads
(quiet, negative and signalling) and with infinities; afterwards the bytes of
every input buffer must be bitwise what they were (the whole buffer under a
strided view, not only the viewed elements). The same call then runs on
read-only copies (``setflags(write=False)``) and must give the same result,
``out=`` a separate array must too, and in place (``out=x``) must still work
and leave every other input alone. A last test maps its inputs from a file
with ``PROT_READ``, so that any write to them, even of the same bytes, crashes.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import TOLERANCE

import fastmask as fm
from fastmask import masks
from fastmask.compat import tf

B, H, Q, N = 2, 3, 4, 9
SHAPE = (B, H, Q, N)

# attention: grouped-query heads (4 query heads over 2 kv heads)
HQ, HK, LQ, LK, D, DV = 4, 2, 5, 7, 8, 6

# Signalling NaNs warn where NumPy casts them (a bias cast to the compute dtype).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

KINDS = np.array([0, 1, 1, 2, 0, 1, 2, 2, 0])


@masks.predicate
def _same_kind(b, h, q_idx, k_idx):
    return KINDS[q_idx] == KINDS[k_idx] or k_idx == 0


@masks.score
def _tilt(s, b, h, q_idx, k_idx):
    return s - 0.25 * abs(q_idx - k_idx) + h


# ---------------------------------------------------------------------- helpers


def _payloads(a: np.ndarray) -> np.ndarray:
    """Plant NaNs with payloads (quiet, negative quiet, signalling) and +-inf in float ``a``."""
    if a.dtype.kind != "f":
        return a
    native = a.dtype.newbyteorder("=")
    bits = {
        2: [0x7E01 | 0x2A, 0xFE00 | 0x15, 0x7C01 | 0x5],
        4: [0x7FC00000 | 0x1234, 0xFFC00000 | 0xBEEF, 0x7F800000 | 0x42],
        8: [0x7FF8000000000000 | 0xC0FFEE, 0xFFF8000000000000 | 0x5EED, 0x7FF0000000000000 | 7],
    }[native.itemsize]
    special = np.array(bits, f"u{native.itemsize}").view(native).astype(a.dtype)
    special = np.concatenate([special, np.array([np.inf, -np.inf], a.dtype)])
    flat = a.reshape(-1)
    step = max(1, flat.size // (len(special) + 1))
    flat[step : step * (len(special) + 1) : step][: len(special)] = special
    return a


def _snapshot(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: a.copy() for name, a in arrays.items()}


def _assert_untouched(arrays, before, skip: np.ndarray | None = None) -> None:
    for name, a in arrays.items():
        if skip is not None and np.shares_memory(a, skip):
            continue
        b = before[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"input {name!r} was modified"


def _copies(arrays, writable: bool) -> dict[str, np.ndarray]:
    out = {}
    for name, a in arrays.items():
        c = a.copy()
        c.setflags(write=writable)
        out[name] = c
    return out


def _same_result(got, expected) -> None:
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            _same_result(g, e)
        return
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # Same NaNs and exact zeros; values to the dtype's tolerance, not bitwise: the
    # numba kernels may round the last bit differently from one call to the next
    # (which loop variant runs depends on where their scratch buffers land).
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(got == 0, expected == 0)
    np.testing.assert_allclose(got, expected, equal_nan=True, **TOLERANCE[got.dtype])


def _call_or_skip(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ValueError as exc:
        if "cannot serve" in str(exc):  # e.g. cython and user predicates
            pytest.skip(str(exc))
        raise


# ----------------------------------------------------------- masked_softmax


def _softmax_inputs(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(np.dtype(dtype).str.encode()))
    x = _payloads((rng.standard_normal(SHAPE) * 3).astype(dtype))
    big = (rng.standard_normal((B, H, 2 * Q, 2 * N)) * 3).astype(dtype)
    return {
        "x": x,
        "x_big": _payloads(big),  # passed as a strided, reversed view
        "x_swapped": x.astype(x.dtype.newbyteorder(">" if x.dtype.isnative else "<")),
        "keep_bool": rng.random((B, 1, 1, N)) < 0.7,
        "keep_float": _payloads(np.where(rng.random((B, 1, Q, N)) < 0.6, 0.5, 0.0)),
        "drop_int": (rng.random((1, H, 1, N)) < 0.3).astype(np.int8),
        "lengths": np.array([N, 4], np.int64),
        "lengths32": np.array([3, 0], np.int32),
        "q_ids": np.array([0, 0, 1, 1], np.int32),
        "k_ids": np.array([0, 0, 0, 0, 1, 1, 1, 1, 1], np.int32),
        "k_ids_scattered": np.array([[0, 1, 0, 1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 1, 0, 0, 0, 1]]),
        "q_ids_2d": np.array([[0, 1, 0, 1], [1, 0, 0, 1]], np.int16),
        "prefix": np.array([2, 5], np.int16),
        "bias": _payloads(
            np.where(
                rng.random((1, H, 1, N)) < 0.2, -np.inf, rng.standard_normal((1, H, 1, N))
            ).astype(dtype)
        ),
        "bias_f64": _payloads(rng.standard_normal(SHAPE)),
        "bias_swapped": rng.standard_normal(N).astype(">f8"),
    }


SOFTMAX_CASES = {
    "plain": lambda a: (a["x"], None, {}),
    "bool-array": lambda a: (a["x"], a["keep_bool"], {}),
    "keep": lambda a: (a["x"], masks.keep(a["keep_float"]), {}),
    "drop": lambda a: (a["x"], masks.drop(a["drop_int"]), {}),
    "padding": lambda a: (a["x"], masks.padding(a["lengths"]), {}),
    "padding-left": lambda a: (a["x"], masks.padding(a["lengths32"], side="left"), {}),
    "causal": lambda a: (a["x"], masks.causal(1), {}),
    "causal-bottom-right": lambda a: (a["x"], masks.causal(align="bottom-right"), {}),
    "sliding-window": lambda a: (a["x"], masks.sliding_window(3), {}),
    "band": lambda a: (a["x"], masks.sliding_window(2, causal=False), {}),
    "segments": lambda a: (a["x"], masks.segments(a["q_ids"], a["k_ids"]), {}),
    "segments-scattered": lambda a: (
        a["x"],
        masks.segments(a["q_ids_2d"], a["k_ids_scattered"]),
        {},
    ),
    "prefix-lm": lambda a: (a["x"], masks.prefix_lm(a["prefix"]), {}),
    "predicate": lambda a: (a["x"], _same_kind, {}),
    "score": lambda a: (a["x"], _tilt, {"scale": 0.5}),
    "causal&padding&keep": lambda a: (
        a["x"],
        masks.causal() & masks.padding(a["lengths"]) & masks.keep(a["keep_bool"]),
        {},
    ),
    "keep&drop": lambda a: (a["x"], masks.keep(a["keep_float"]) & masks.drop(a["drop_int"]), {}),
    "predicate&padding": lambda a: (a["x"], _same_kind & masks.padding(a["lengths"]), {}),
    "score&segments": lambda a: (
        a["x"],
        _tilt & masks.segments(a["q_ids"], a["k_ids"]),
        {"bias": a["bias"]},
    ),
    "bias": lambda a: (a["x"], None, {"bias": a["bias"]}),
    "bias-f64+causal+scale": lambda a: (
        a["x"],
        masks.causal(),
        {"bias": a["bias_f64"], "scale": 0.3},
    ),
    "bias-swapped+bool": lambda a: (a["x"], a["keep_bool"], {"bias": a["bias_swapped"]}),
    "scale": lambda a: (a["x"], None, {"scale": 2.5}),
    "axis-1": lambda a: (a["x"], a["keep_bool"], {"axis": 1, "bias": a["bias"]}),
    "strided-x": lambda a: (a["x_big"][:, ::-1, 1::2, ::-2], masks.padding(a["lengths"]), {}),
    "swapped-x": lambda a: (a["x_swapped"], masks.keep(a["keep_bool"]), {"bias": a["bias"]}),
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_masked_softmax_and_explain(backend, case, dtype):
    make = SOFTMAX_CASES[case]
    arrays = _softmax_inputs(dtype)
    before = _snapshot(arrays)

    x, mask, kw = make(arrays)
    y = _call_or_skip(fm.masked_softmax, x, mask, backend=backend, **kw)
    _assert_untouched(arrays, before)
    fm.explain(x, mask, backend=backend, **kw)
    _assert_untouched(arrays, before)

    # out= a separate array: same result, inputs untouched
    out = np.full(y.shape, 7, y.dtype)
    assert _call_or_skip(fm.masked_softmax, x, mask, out=out, backend=backend, **kw) is out
    _same_result(out, y)
    _assert_untouched(arrays, before)

    # read-only inputs: same result
    ro = _copies(arrays, writable=False)
    x2, mask2, kw2 = make(ro)
    _same_result(_call_or_skip(fm.masked_softmax, x2, mask2, backend=backend, **kw2), y)
    fm.explain(x2, mask2, backend=backend, **kw2)
    _assert_untouched(ro, before)

    # in place: x itself is the out argument; nothing else changes
    if not x.dtype.isnative:
        with pytest.raises(ValueError, match="dtype"):  # the result is native-endian
            fm.masked_softmax(x, mask, out=x, backend=backend, **kw)
        return
    rw = _copies(arrays, writable=True)
    x3, mask3, kw3 = make(rw)
    assert _call_or_skip(fm.masked_softmax, x3, mask3, out=x3, backend=backend, **kw3) is x3
    _same_result(x3, y)
    _assert_untouched(rw, before, skip=x3)


# --------------------------------------------------------------- attention


def _attention_inputs(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(b"attention" + np.dtype(dtype).str.encode()))

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return {
        "q": _payloads(normal(B, HQ, LQ, D)),
        "q_big": normal(B, HQ, 2 * LQ, 2 * D),  # passed as a strided view
        "k": normal(B, HK, LK, D),
        "v": _payloads(normal(B, HK, LK, DV)),
        "keep_bool": rng.random((B, 1, LQ, LK)) < 0.7,
        "drop_float": _payloads((rng.random((1, HQ, 1, LK)) < 0.3).astype(np.float32)),
        "lengths": np.array([LK, 3], np.int64),
        "q_ids": np.array([0, 0, 0, 1, 1], np.int64),
        "k_ids": np.array([0, 0, 1, 1, 1, 1, 1], np.int64),
        "prefix": np.array([2, 4], np.int32),
        "bias": _payloads(normal(1, HQ, 1, LK)),
        "bias_full": normal(B, HQ, LQ, LK),
    }


ATTENTION_CASES = {
    "plain": lambda a: ((a["q"], a["k"], a["v"]), {}),
    "bool-array": lambda a: ((a["q"], a["k"], a["v"], a["keep_bool"]), {}),
    "drop": lambda a: ((a["q"], a["k"], a["v"], masks.drop(a["drop_float"])), {}),
    "padding": lambda a: ((a["q"], a["k"], a["v"], masks.padding(a["lengths"])), {}),
    "causal-bottom-right": lambda a: (
        (a["q"], a["k"], a["v"], masks.causal(align="bottom-right")),
        {},
    ),
    "sliding-window": lambda a: ((a["q"], a["k"], a["v"], masks.sliding_window(2)), {}),
    "segments": lambda a: (
        (a["q"], a["k"], a["v"], masks.segments(a["q_ids"], a["k_ids"])),
        {},
    ),
    "prefix-lm": lambda a: ((a["q"], a["k"], a["v"], masks.prefix_lm(a["prefix"])), {}),
    "causal&padding&keep": lambda a: (
        (
            a["q"],
            a["k"],
            a["v"],
            masks.causal() & masks.padding(a["lengths"]) & masks.keep(a["keep_bool"]),
        ),
        {},
    ),
    "bias+scale": lambda a: ((a["q"], a["k"], a["v"]), {"bias": a["bias"], "scale": 0.2}),
    "bias-full+padding": lambda a: (
        (a["q"], a["k"], a["v"], masks.padding(a["lengths"])),
        {"bias": a["bias_full"]},
    ),
    "strided-q": lambda a: ((a["q_big"][..., ::2, 1::2], a["k"], a["v"], masks.causal()), {}),
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_and_explain(backend, case, dtype):
    make = ATTENTION_CASES[case]
    arrays = _attention_inputs(dtype)
    before = _snapshot(arrays)
    args, kw = make(arrays)
    o = _call_or_skip(fm.attention, *args, backend=backend, **kw)
    ow = _call_or_skip(fm.attention, *args, return_weights=True, backend=backend, **kw)
    fm.explain_attention(*args, backend=backend, **kw)
    _assert_untouched(arrays, before)

    ro = _copies(arrays, writable=False)
    args2, kw2 = make(ro)
    _same_result(_call_or_skip(fm.attention, *args2, backend=backend, **kw2), o)
    _same_result(
        _call_or_skip(fm.attention, *args2, return_weights=True, backend=backend, **kw2), ow
    )
    _assert_untouched(ro, before)


# ------------------------------------------------------------ compat.tf


def test_compat_tf_functions():
    rng = np.random.default_rng(5)
    seq = np.array([[5, 3, 9, 0, 0], [7, 0, 4, 1, 0]], np.int64)  # row 1: not a tail
    arrays = {
        "seq": seq,
        "q": _payloads(rng.standard_normal((2, 3, 4, 8)).astype(np.float32)),
        "k": rng.standard_normal((2, 3, 5, 8)).astype(np.float32),
        "v": _payloads(rng.standard_normal((2, 3, 5, 6)).astype(np.float32)),
        "mask": _payloads(tf.create_padding_mask(seq)),  # (2, 1, 1, 5), 1.0 = masked
        "bool_mask": (rng.random((4, 5)) < 0.4),
    }
    before = _snapshot(arrays)

    def run(a):
        return (
            tf.scaled_dot_product_attention(a["q"], a["k"], a["v"], a["mask"]),
            tf.scaled_dot_product_attention(a["q"], a["k"], a["v"], a["bool_mask"]),
            tf.scaled_dot_product_attention(a["q"], a["k"], a["v"], None),
            tf.scaled_dot_product_attention(a["q"], a["k"], a["v"], tf.padding_strategy(a["seq"])),
            tf.create_padding_mask(a["seq"]),
        )

    results = run(arrays)
    _assert_untouched(arrays, before)
    ro = _copies(arrays, writable=False)
    for got, expected in zip(run(ro), results, strict=True):
        _same_result(got, expected)
    _assert_untouched(ro, before)


# ---------------------------------------------------------------- fastmask.dask


def test_dask_masked_softmax_and_attention():
    da = pytest.importorskip("dask.array")
    import fastmask.dask as fmd

    def run(a):
        xs = da.from_array(a["x"], chunks=(1, 3, 2, 5))  # softmax axis split: two passes
        q = da.from_array(a["q"], chunks=(1, 2, 5, 8))
        k = da.from_array(a["k"], chunks=(1, 2, 7, 8))
        v = da.from_array(a["v"], chunks=(1, 2, 7, 6))
        graphs = (
            fmd.masked_softmax(xs, a["keep_bool"], bias=a["bias"], scale=0.5),
            fmd.masked_softmax(a["x"], masks.padding(a["lengths"]) & masks.causal()),
            fmd.masked_softmax(xs, fmd.drop(da.from_array(a["drop_int"]))),
            fmd.masked_softmax(xs, _tilt & masks.segments(a["q_ids"], a["k_ids"])),
            fmd.attention(q, k, v, masks.padding(a["k_lengths"]), bias=a["att_bias"]),
            fmd.attention(q, k, v, a["att_keep"], return_weights=True)[1],
        )
        return [g.compute(scheduler="synchronous") for g in graphs]

    s = _softmax_inputs(np.float32)
    t = _attention_inputs(np.float32)
    arrays = {
        "x": s["x"],
        "keep_bool": s["keep_bool"],
        "bias": s["bias"],
        "lengths": s["lengths"],
        "drop_int": s["drop_int"],
        "q_ids": s["q_ids"],
        "k_ids": s["k_ids"],
        "q": t["q"],
        "k": t["k"],
        "v": t["v"],
        "k_lengths": t["lengths"],
        "att_bias": t["bias"],
        "att_keep": t["keep_bool"],
    }
    before = _snapshot(arrays)
    results = run(arrays)
    _assert_untouched(arrays, before)
    ro = _copies(arrays, writable=False)
    for got, expected in zip(run(ro), results, strict=True):
        _same_result(got, expected)
    _assert_untouched(ro, before)


# ------------------------------------------------------ truly read-only memory


def _mapped_read_only(folder, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each array copied into a file and mapped back with PROT_READ: a write would crash."""
    folder.mkdir()
    mapped = {}
    for name, a in arrays.items():
        path = folder / f"{name}.bin"
        a = np.ascontiguousarray(a)
        a.tofile(path)
        m = np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape)
        assert not m.flags.writeable
        mapped[name] = m
    return mapped


def test_inputs_in_read_only_pages(backend, tmp_path):
    s = _softmax_inputs(np.float32)
    t = _attention_inputs(np.float32)
    ms = _mapped_read_only(tmp_path / "softmax", s)
    mt = _mapped_read_only(tmp_path / "attention", t)
    for case in ("plain", "bool-array", "causal&padding&keep", "bias", "strided-x", "axis-1"):
        x, mask, kw = SOFTMAX_CASES[case](s)
        y = fm.masked_softmax(x, mask, backend=backend, **kw)
        x, mask, kw = SOFTMAX_CASES[case](ms)
        _same_result(fm.masked_softmax(x, mask, backend=backend, **kw), y)
    for case in ("plain", "bool-array", "causal&padding&keep", "bias-full+padding"):
        args, kw = ATTENTION_CASES[case](t)
        o = fm.attention(*args, return_weights=True, backend=backend, **kw)
        args, kw = ATTENTION_CASES[case](mt)
        _same_result(fm.attention(*args, return_weights=True, backend=backend, **kw), o)
