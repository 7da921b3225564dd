"""What fastmask is compared with: the copy floor, the NumPy reference, PyTorch, ONNX Runtime.

Attention workloads are compared with PyTorch's ``scaled_dot_product_attention``
(a boolean mask, or ``is_causal``), ONNX Runtime (the unfused graph) and the
TensorFlow tutorial's function, both through ``fastmask.compat.tf`` and in plain NumPy.

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
    if inp.bias is not None:
        bt = torch.from_numpy(inp.bias)
        return (lambda: torch.softmax(xt + bt, -1)), "torch.softmax(x + bias, -1)"
    if inp.keep is None:
        return (lambda: torch.softmax(xt, -1)), "torch.softmax"
    drop = torch.from_numpy(~inp.keep)
    return (
        lambda: torch.softmax(xt.masked_fill(drop, float("-inf")), -1)
    ), "torch.softmax(x.masked_fill(~keep, -inf), -1)"


def make_torch_masked_softmax(inp: Inputs, threads: int) -> Peer:
    """``torch._masked_softmax``, PyTorch's fused kernel (True = masked out)."""
    torch = _torch()
    if torch is None:
        return None, "torch not installed (pip install 'fastmask[bench]')"
    if inp.keep is None:
        return None, "needs a mask"
    torch.set_num_threads(threads)
    xt = torch.from_numpy(inp.x)
    b, _, lq, lk = inp.x.shape
    if lq == lk and inp.keep.shape == (b, 1, 1, lk):
        # mask_type 1: a (B, L) key padding mask on (B, H, L, L) input.
        drop = torch.from_numpy(np.ascontiguousarray(~inp.keep[:, 0, 0, :]))
        return (
            lambda: torch._masked_softmax(xt, drop, -1, 1)
        ), "torch._masked_softmax, (B, L) key padding mask (mask_type=1)"
    # mask_type 2 needs the mask at the input's full shape (expanded once, untimed).
    drop = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(~inp.keep, inp.x.shape)))
    return (
        lambda: torch._masked_softmax(xt, drop, -1, 2)
    ), "torch._masked_softmax, mask expanded to the input's shape (mask_type=2)"


_ONNX_TYPES = {np.dtype(np.float32): "FLOAT", np.dtype(np.float64): "DOUBLE",
               np.dtype(np.float16): "FLOAT16"}  # fmt: skip


def make_onnxruntime(inp: Inputs, threads: int) -> Peer:
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None, "onnxruntime/onnx not installed (pip install 'fastmask[bench]')"
    dtype = inp.x.dtype
    elem = getattr(TensorProto, _ONNX_TYPES[dtype])
    if inp.bias is not None:
        bias = inp.bias.astype(dtype)
    elif inp.keep is None:
        bias = np.zeros((1,) * inp.x.ndim, dtype)
    else:
        # -1e9 overflows float16 to -inf; -65504 is its most negative finite value.
        big = -65504.0 if dtype == np.float16 else -1e9
        bias = np.where(inp.keep, 0.0, big).astype(dtype)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "bias"], ["z"]),
            helper.make_node("Softmax", ["z"], ["y"], axis=-1),
        ],
        "add_softmax",
        [
            helper.make_tensor_value_info("x", elem, list(inp.x.shape)),
            helper.make_tensor_value_info("bias", elem, list(bias.shape)),
        ],
        [helper.make_tensor_value_info("y", elem, list(inp.x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # e.g. no CPU kernel for this dtype
        return None, f"ONNX Runtime cannot run it: {str(exc).splitlines()[0][:80]}"
    feeds = {"x": inp.x, "bias": bias}
    return (lambda: sess.run(None, feeds)), "ONNX Runtime Add(x, mask*-1e9) + Softmax"


# ------------------------------------------------------------------ attention workloads


def make_attention_copy(inp: Inputs, threads: int) -> Peer:
    ins = (inp.q, inp.k, inp.v)
    outs = [np.empty_like(a) for a in ins]

    def copy():
        for o, a in zip(outs, ins, strict=True):
            np.copyto(o, a)

    return copy, "np.copyto of q, k and v into preallocated arrays"


def make_fastmask_attention(inp: Inputs, threads: int, backend: str | None) -> Peer:
    kwargs = dict(inp.kwargs, backend=backend)
    return (lambda: fm.attention(inp.q, inp.k, inp.v, **kwargs)), ""


def make_numpy_attention(inp: Inputs, threads: int) -> Peer:
    return None, "fastmask's NumPy reference materialises float64 scores: too slow here"


def make_torch_sdpa(inp: Inputs, threads: int) -> Peer:
    torch = _torch()
    if torch is None:
        return None, "torch not installed (pip install 'fastmask[bench]')"
    torch.set_num_threads(threads)
    q, k, v = (torch.from_numpy(a) for a in (inp.q, inp.k, inp.v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if inp.causal:
        return (lambda: sdpa(q, k, v, is_causal=True)), "torch SDPA is_causal=True"
    if inp.keep is None:
        return (lambda: sdpa(q, k, v)), "torch SDPA"
    mask = torch.from_numpy(np.ascontiguousarray(inp.keep))
    return (lambda: sdpa(q, k, v, attn_mask=mask)), "torch SDPA, boolean attn_mask (True = keep)"


def _tf_mask(inp: Inputs) -> np.ndarray | None:
    """The tutorial's float mask (1.0 = masked) for the workload."""
    return None if inp.keep is None else (~inp.keep).astype(np.float32)


def make_tf_compat(inp: Inputs, threads: int) -> Peer:
    mask = _tf_mask(inp)
    return (
        lambda: fm.compat.tf.scaled_dot_product_attention(inp.q, inp.k, inp.v, mask)
    ), "the TF tutorial's function via fastmask.compat.tf (materialises the logits)"


def tf_tutorial_numpy(q, k, v, mask):
    """The TF tutorial's scaled_dot_product_attention, line by line in plain NumPy."""
    matmul_qk = np.matmul(q, np.swapaxes(k, -1, -2))
    dk = np.float32(k.shape[-1])
    scaled_attention_logits = matmul_qk / np.sqrt(dk)
    if mask is not None:
        scaled_attention_logits += mask * np.float32(-1e9)
    e = np.exp(scaled_attention_logits - scaled_attention_logits.max(-1, keepdims=True))
    attention_weights = e / e.sum(-1, keepdims=True)
    return np.matmul(attention_weights, v), attention_weights


def make_tf_numpy(inp: Inputs, threads: int) -> Peer:
    mask = _tf_mask(inp)
    return (
        lambda: tf_tutorial_numpy(inp.q, inp.k, inp.v, mask)
    ), "the TF tutorial's function in plain NumPy"


def make_onnxruntime_attention(inp: Inputs, threads: int) -> Peer:
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None, "onnxruntime/onnx not installed (pip install 'fastmask[bench]')"
    q, k, v = inp.q, inp.k, inp.v
    if q.dtype != np.float32:
        return None, "float32 only here"
    bias = (
        np.zeros((1, 1), np.float32)
        if inp.keep is None
        else np.where(inp.keep, 0.0, -1e9).astype(np.float32)
    )
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / np.sqrt(q.shape[-1])])
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Mul", ["s", "scale"], ["z"]),
            helper.make_node("Add", ["z", "bias"], ["zb"]),
            helper.make_node("Softmax", ["zb"], ["w"], axis=-1),
            helper.make_node("MatMul", ["w", "v"], ["o"]),
        ],
        "attention",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
            for n, a in (("q", q), ("k", k), ("v", v), ("bias", bias))
        ],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [*q.shape[:-1], v.shape[-1]])],
        initializer=[scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"q": q, "k": k, "v": v, "bias": bias}
    return (
        lambda: sess.run(None, feeds)
    ), "ONNX Runtime MatMul + Mul + Add(mask*-1e9) + Softmax + MatMul"
