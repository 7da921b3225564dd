"""One set of rules: a bad call gets the same error on the host, on a device and in Dask.

The device path is exercised with a stand-in device array (``__cuda_array_interface__``
over host memory) and a stand-in device backend: validation reads no device memory
and raises before any backend runs, so no GPU is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BackendsPlugin

import fastmask as fm
from fastmask import masks
from fastmask.device import DEVICE_ATTENTION_OP, DEVICE_OP
from fastmask.rules import Operand, check_out

da = pytest.importorskip("dask.array")
fmd = pytest.importorskip("fastmask.dask")


class FakeDeviceArray:
    """A host array dressed as a device array: only its interface is ever read."""

    def __init__(self, a: np.ndarray, readonly: bool = False) -> None:
        self.a = a
        self.__cuda_array_interface__ = {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "data": (a.__array_interface__["data"][0], readonly),
            "strides": a.strides,
            "version": 3,
        }


class StandInDeviceBackend(fm.Backend):
    name = "stand-in-device"
    description = "validation tests: accepts every device call, runs none"
    device = "cuda"
    ops = frozenset({DEVICE_OP, DEVICE_ATTENTION_OP})

    def check(self, request):
        return fm.Verdict.yes("stand-in", 1.0)


@pytest.fixture
def device_backend():
    plugin = BackendsPlugin(StandInDeviceBackend())
    fm.plugins.register(plugin, name="stand-in-device")
    try:
        yield
    finally:
        fm.plugins.unregister(plugin)


def _error(fn):
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return None, None


X = np.zeros((2, 3, 4, 5), np.float32)
F32 = np.float32

#: (name, kwargs builder) for masked_softmax: every case must fail the same way on each path.
SOFTMAX_CASES = {
    "float mask": lambda: {"mask": np.ones((5,), F32)},
    "int mask": lambda: {"mask": np.ones((5,), np.int64)},
    "mask shape": lambda: {"mask": np.ones((3, 5), bool)},
    "mask ndim": lambda: {"mask": np.ones((1, 1, 1, 1, 5), bool)},
    "keep(a) shape": lambda: {"mask": masks.keep(np.ones((3, 5), bool))},
    "keep(a) in &": lambda: {"mask": masks.keep(np.ones((3, 5), bool)) & masks.causal()},
    "bias shape": lambda: {"bias": np.zeros((4,), F32)},
    "bias ndim": lambda: {"bias": np.zeros((1, 1, 1, 1, 5), F32)},
    "scale nan": lambda: {"scale": float("nan")},
    "scale str": lambda: {"scale": "0.1"},
    "scale bool": lambda: {"scale": True},
    "axis float": lambda: {"axis": 1.5},
    "axis range": lambda: {"axis": 4},
    "structured axis": lambda: {"mask": masks.causal(), "axis": 0},
}


def _softmax_paths(x: np.ndarray, kw: dict) -> dict:
    def dev(a):
        return FakeDeviceArray(a) if isinstance(a, np.ndarray) else a

    return {
        "host": lambda: fm.explain(x, **kw),
        "device": lambda: fm.explain(FakeDeviceArray(x), **{k: v for k, v in kw.items()}),
        "device operands": lambda: fm.explain(
            FakeDeviceArray(x), **{k: dev(v) if k in ("mask", "bias") else v for k, v in kw.items()}
        ),
        "dask": lambda: fmd.masked_softmax(da.from_array(x, chunks=(1, 3, 4, 5)), **kw),
    }


@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_softmax_errors_agree_on_every_path(case, device_backend):
    kw = SOFTMAX_CASES[case]()
    got = {path: _error(fn) for path, fn in _softmax_paths(X, kw).items()}
    if case.startswith("keep(a)"):  # a strategy object is not a device operand
        got.pop("device operands")
    host = got["host"]
    assert host[0] is not None, "the host call accepted a bad input"
    for path, err in got.items():
        assert err == host, f"{path}: {err} != host: {host}"


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_dtype_errors_agree_on_every_path(dtype, device_backend):
    x = np.zeros((2, 5), dtype)
    host = _error(lambda: fm.explain(x))
    dev = _error(lambda: fm.explain(FakeDeviceArray(x)))
    dsk = _error(lambda: fmd.masked_softmax(da.from_array(x)))
    assert host[0] is TypeError and dsk == host
    # A device names what a device takes (no bfloat16 there); the rest of the rule is one.
    assert dev[0] is TypeError and "float16, float32 or float64 on a device" in dev[1]
    b = np.zeros(5, dtype)
    host_b = _error(lambda: fm.explain(X, bias=b))
    assert host_b[0] is TypeError and host_b[1].startswith("bias must be")
    assert _error(lambda: fmd.masked_softmax(da.from_array(X), bias=b)) == host_b
    assert _error(lambda: fm.explain(FakeDeviceArray(X), bias=b)) == host_b  # a host bias


Q = np.zeros((2, 4, 6, 8), np.float32)
K = np.zeros((2, 2, 7, 8), np.float32)
V = np.zeros((2, 2, 7, 3), np.float32)

#: (name, (q, k, v, kwargs) builder) for attention.
ATTENTION_CASES = {
    "dtype mix": lambda: (Q, K.astype(np.float64), V, {}),
    "D differs": lambda: (Q, K[..., :5], V, {}),
    "Lk differs": lambda: (Q, K, V[..., :6, :], {}),
    "heads": lambda: (np.zeros((2, 3, 6, 8), F32), K, V, {}),
    "q 1-d": lambda: (np.zeros(8, F32), K, V, {}),
    "return_weights": lambda: (Q, K, V, {"return_weights": "yes"}),
    "scale inf": lambda: (Q, K, V, {"scale": float("inf")}),
    "mask dtype": lambda: (Q, K, V, {"mask": np.ones((7,), np.uint8)}),
    "mask shape": lambda: (Q, K, V, {"mask": np.ones((6, 5), bool)}),
    "keep(a) shape": lambda: (Q, K, V, {"mask": masks.keep(np.ones((6, 5), bool))}),
    "bias dtype": lambda: (Q, K, V, {"bias": np.zeros(7, np.int8)}),
    "bias shape": lambda: (Q, K, V, {"bias": np.zeros((3, 7), F32)}),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_errors_agree_on_every_path(case, device_backend):
    q, k, v, kw = ATTENTION_CASES[case]()
    dev = [FakeDeviceArray(a) for a in (q, k, v)]
    got = {
        "host": _error(lambda: fm.explain_attention(q, k, v, **kw)),
        "device": _error(lambda: fm.explain_attention(*dev, **kw)),
        "dask": _error(lambda: fmd.attention(*(da.from_array(a) for a in (q, k, v)), **kw)),
    }
    host = got["host"]
    assert host[0] is not None, "the host call accepted a bad input"
    for path, err in got.items():
        if case == "bias dtype" and path == "device":
            assert err[0] is TypeError and err[1].startswith("bias must be")
            continue
        assert err == host, f"{path}: {err} != host: {host}"


# --- out: host and device (Dask calls return new arrays) ---


def _out_cases():
    base = np.zeros((4, 6), F32)
    x = base[:2]
    return {
        "shape": (x, np.zeros((2, 5), F32)),
        "dtype": (x, np.zeros((2, 6), np.float64)),
        "overlaps x": (x, base[1:3]),
        "overlaps itself": (x, np.lib.stride_tricks.as_strided(np.zeros(6, F32), (2, 6), (0, 4))),
    }


@pytest.mark.parametrize("case", ["shape", "dtype", "overlaps x", "overlaps itself", "read-only"])
def test_out_errors_agree_on_host_and_device(case, device_backend):
    if case == "read-only":
        x = np.zeros((2, 6), F32)
        o = np.zeros((2, 6), F32)
        o.flags.writeable = False
        dev_out = FakeDeviceArray(o, readonly=True)
    else:
        x, o = _out_cases()[case]
        dev_out = FakeDeviceArray(o)
    host = _error(lambda: fm.explain(x, out=o))
    dev = _error(lambda: fm.explain(FakeDeviceArray(x), out=dev_out))
    assert host[0] is ValueError
    assert dev == host


@pytest.mark.parametrize("operand", ["mask", "bias"])
def test_out_must_not_alias_what_the_kernels_read(operand, device_backend):
    buf = np.zeros(48, np.uint8)
    out = buf.view(F32).reshape(2, 6)
    read = buf[:12].view(bool).reshape(2, 6) if operand == "mask" else out[:, ::-1]
    x = np.zeros((2, 6), F32)
    kw = {operand: read}
    host = _error(lambda: fm.explain(x, out=out, **kw))
    dev = _error(
        lambda: fm.explain(
            FakeDeviceArray(x), out=FakeDeviceArray(out), **{operand: FakeDeviceArray(read)}
        )
    )
    assert host == (ValueError, host[1]) and f"shares memory with the {operand}" in host[1]
    assert dev == host
    # A device out is never taken for an alias of a host operand (other memory).
    assert _error(lambda: fm.explain(FakeDeviceArray(x), out=FakeDeviceArray(out), **kw)) == (
        None,
        None,
    )


def test_out_of_the_other_kind_is_refused(device_backend):
    x = np.zeros((2, 6), F32)
    err = _error(lambda: fm.explain(FakeDeviceArray(x), out=np.zeros((2, 6), F32)))
    assert err[0] is ValueError and "out must be a device array" in err[1]
    with pytest.raises(TypeError, match="GPU device array"):
        fm.explain(x, out=FakeDeviceArray(np.zeros((2, 6), F32)))


def test_the_rules_take_any_operand_description():
    a = np.zeros((2, 3), F32)
    assert check_out(Operand.of_host(a, "out"), Operand.of_host(a, "x")) is True
    assert check_out(Operand.of_host(a.copy(), "out"), Operand.of_host(a, "x")) is False
    d = Operand.of_device(FakeDeviceArray(a), "out")
    assert d.shape == (2, 3) and d.where == "device" and d.memory is d.source
    assert Operand.of_dask(da.from_array(a), "x").memory is None


def test_dask_keep_along_another_axis_matches_memory():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5)).astype(F32)
    m = rng.random((3, 4, 1)) > 0.3
    want = fm.masked_softmax(x, masks.keep(m), axis=1)
    got = fmd.masked_softmax(da.from_array(x, chunks=(1, 4, 5)), masks.keep(m), axis=1)
    np.testing.assert_array_equal(got.compute(), want)
