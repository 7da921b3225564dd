"""What fastmask is compared with: the copy floor, the NumPy reference, PyTorch, ONNX Runtime.

Each ``make_*`` returns ``(callable, note)``; the callable is None (and the note
says why) when the peer is not installed or cannot express the workload.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import fastmask as fm

from .workloads import Inputs

Peer = tuple[Callable[[], object] | None, str]


def make_copy(inp: Inputs, threads: int) -> Peer:
    out = np.empty_like(inp.x)
    return (lambda: np.copyto(out, inp.x)), "np.copyto into a preallocated array"


def make_fastmask(inp: Inputs, threads: int, backend: str | None, preallocated: bool) -> Peer:
    kwargs = dict(inp.kwargs, backend=backend)
    if preallocated:
        kwargs["out"] = np.empty_like(inp.x)
    return (lambda: fm.masked_softmax(inp.x, **kwargs)), ""


def make_numpy_reference(inp: Inputs, threads: int) -> Peer:
    return make_fastmask(inp, threads, "numpy", False)[0], "fastmask's NumPy reference (float64)"


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def make_torch_masked_fill(inp: Inputs, threads: int) -> Peer:
    torch = _torch()
    if torch is None:
        return None, "torch not installed (pip install 'fastmask[bench]')"
    torch.set_num_threads(threads)
    xt = torch.from_numpy(inp.x)
    if inp.keep is None:
        return (lambda: torch.softmax(xt, -1)), "torch.softmax"
    drop = torch.from_numpy(~inp.keep)
    return (
        lambda: torch.softmax(xt.masked_fill(drop, float("-inf")), -1)
    ), "torch.softmax(x.masked_fill(~keep, -inf), -1)"


def make_onnxruntime(inp: Inputs, threads: int) -> Peer:
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None, "onnxruntime/onnx not installed (pip install 'fastmask[bench]')"
    if inp.x.dtype != np.float32:
        return None, "float32 only here"
    if inp.keep is None:
        bias = np.zeros((1,) * inp.x.ndim, np.float32)
    else:
        bias = np.where(inp.keep, 0.0, -1e9).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "bias"], ["z"]),
            helper.make_node("Softmax", ["z"], ["y"], axis=-1),
        ],
        "add_softmax",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(inp.x.shape)),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, list(bias.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(inp.x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"x": inp.x, "bias": bias}
    del onnx
    return (lambda: sess.run(None, feeds)), "ONNX Runtime Add(x, mask*-1e9) + Softmax"
