"""What fastmask is compared with: the copy floor, the NumPy reference, PyTorch, ONNX Runtime.

Attention workloads are compared with PyTorch's ``scaled_dot_product_attention``
(a boolean mask, or ``is_causal``) and FlexAttention (compiled, with a block mask),
ONNX Runtime (the unfused graph, and its fused ``com.microsoft`` MultiHeadAttention /
GroupQueryAttention ops), OpenVINO's ``ScaledDotProductAttention`` and the TensorFlow
tutorial's function, both through ``fastmask.compat.tf`` and in plain NumPy. Each
computes the same attention as ``fm.attention`` (same mask, grouped-query attention
included); layout conversions and masks are made once, outside the timed call.

Each ``make_*`` returns ``(callable, note)``; the callable is None (and the note
says why) when the peer is not installed or cannot express the workload. An
attention callable may carry ``read`` (see :func:`output`) for the correctness checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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


def _reads(fn, read):
    """Attach how ``fn()``'s result becomes fastmask's output layout (see :func:`output`)."""
    fn.read = read
    return fn


def output(fn, result) -> np.ndarray:
    """An attention peer's result as ``fm.attention`` returns it (the correctness checks)."""
    read = getattr(fn, "read", None)
    if read is not None:
        result = read(result)
    elif isinstance(result, list | tuple):  # ORT's list of outputs; the tutorial's (out, w)
        result = result[0]
    return result.numpy() if hasattr(result, "numpy") else np.asarray(result)


def _groups(inp: Inputs) -> int:
    """Query heads per kv head (grouped-query attention when > 1)."""
    return inp.q.shape[-3] // inp.k.shape[-3]


def _grouped_q(inp: Inputs):
    """q for peers without grouped-query attention, and how to read their output back.

    q ``(B, Hk*G, Lq, D)`` is viewed, without a copy, as ``(B, Hk, G*Lq, D)``: each kv
    head's G query heads become rows of one head. That is the same attention only while
    the mask does not depend on the query head or row (a key padding mask; decoding);
    otherwise this returns None (k/v would have to be repeated).
    """
    q, g = inp.q, _groups(inp)
    if g == 1:
        return q, lambda o: o
    keep = inp.keep
    if (
        keep is not None
        and keep.ndim >= 2
        and (keep.shape[-2] != 1 or (keep.ndim >= 3 and keep.shape[-3] != 1))
    ):
        return None
    *lead, hq, lq, d = q.shape
    return q.reshape(*lead, hq // g, g * lq, d), lambda o: o.reshape(*lead, hq, lq, o.shape[-1])


_NO_GQA = "grouped-query attention with a per-query mask needs k/v repeated: not done here"


def make_attention_copy(inp: Inputs, threads: int) -> Peer:
    ins = (inp.q, inp.k, inp.v)
    outs = [np.empty_like(a) for a in ins]

    def copy():
        for o, a in zip(outs, ins, strict=True):
            np.copyto(o, a)

    return copy, "np.copyto of q, k and v into preallocated arrays"


def make_kv_read_floor(inp: Inputs, threads: int) -> Peer:
    """Read the kept K and V bytes once (an OR-reduction over their 64-bit words, on
    ``threads`` Python threads, which NumPy's reductions run without the GIL): the
    memory floor of a decode call, which must read them all."""
    if inp.lengths is None or inp.q.shape[-2] != 1 or inp.k.shape[-1] % 2:
        return None, "the memory floor of decode workloads (one query, key padding)"
    lk = inp.k.shape[-2]
    views = []
    for b, n in enumerate(inp.lengths.tolist()):
        keys = slice(lk - n, lk) if inp.side == "left" else slice(0, n)
        views += [a[b, :, keys].view(np.uint64) for a in (inp.k, inp.v) if n]
    pool = ThreadPoolExecutor(max(1, threads))
    parts = [views[i::threads] for i in range(threads)]

    def read():
        list(pool.map(lambda vs: [np.bitwise_or.reduce(v, axis=None) for v in vs], parts))

    nbytes = sum(v.nbytes for v in views)
    return read, f"{nbytes / 1e6:.0f} MB of kept K/V read once on {threads} thread(s)"


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
    gqa = _groups(inp) > 1  # SDPA groups the query heads itself, without repeating k/v
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, enable_gqa=gqa)
    extra = ", enable_gqa" if gqa else ""
    if inp.causal:
        return (lambda: sdpa(q, k, v, is_causal=True)), f"torch SDPA is_causal=True{extra}"
    if inp.keep is None:
        return (lambda: sdpa(q, k, v)), f"torch SDPA{extra}"
    mask = torch.from_numpy(np.ascontiguousarray(inp.keep))
    return (
        lambda: sdpa(q, k, v, attn_mask=mask)
    ), f"torch SDPA, boolean attn_mask (True = keep){extra}"


@functools.cache
def _compiled_flex_attention():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    # Each workload (shape, mask_mod) is one more compiled graph of the same function;
    # past the recompile limit dynamo would silently fall back to eager (slow, unfused).
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(flex_attention, dynamic=False)


def _mask_mod(inp: Inputs, torch):
    """The workload's mask as a FlexAttention ``mask_mod`` from its structure (None: no mask)."""
    from torch.nn.attention.flex_attention import and_masks

    parts = []
    if inp.lengths is not None:
        n, lk = torch.from_numpy(inp.lengths), inp.k.shape[-2]
        if inp.side == "left":  # the valid keys are the last n[b]
            parts.append(lambda b, h, q_idx, kv_idx: kv_idx >= lk - n[b])
        else:
            parts.append(lambda b, h, q_idx, kv_idx: kv_idx < n[b])
    if inp.causal or inp.window is not None:  # fm.masks.causal(): keys j <= i
        parts.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)
    if inp.window is not None:  # fm.masks.sliding_window(w): and j > i - w
        w = inp.window
        parts.append(lambda b, h, q_idx, kv_idx: q_idx - kv_idx < w)
    return and_masks(*parts) if parts else None


def make_torch_flex(inp: Inputs, threads: int) -> Peer:
    """FlexAttention on the CPU: ``torch.compile``d, with the workload's block mask."""
    torch = _torch()
    if torch is None:
        return None, "torch not installed (pip install 'fastmask[bench]')"
    if inp.q.ndim != 4:
        return None, "FlexAttention takes (B, H, L, D) only"
    if inp.keep is not None and inp.lengths is None and not inp.causal and inp.window is None:
        return None, "a dense mask without structure: no mask_mod for it here"
    from torch.nn.attention.flex_attention import create_block_mask

    torch.set_num_threads(threads)
    q, k, v = (torch.from_numpy(a) for a in (inp.q, inp.k, inp.v))
    mask_mod = _mask_mod(inp, torch)
    block_mask = None
    if mask_mod is not None:  # built once per workload; None: broadcast over that axis
        batch = inp.q.shape[0] if inp.lengths is not None else None
        lq, lk = inp.q.shape[-2], inp.k.shape[-2]
        block_mask = create_block_mask(mask_mod, batch, None, lq, lk, device="cpu")
    flex = _compiled_flex_attention()
    gqa = _groups(inp) > 1

    def call():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    try:  # the first call compiles (seconds): here, before the timer's warm-up
        call()
    except Exception as exc:  # e.g. no C++ compiler for inductor
        return None, f"FlexAttention does not compile here: {str(exc).splitlines()[0][:80]}"
    return call, "torch FlexAttention (torch.compile), block mask from a mask_mod" + (
        ", enable_gqa" if gqa else ""
    )


def _tf_mask(inp: Inputs) -> np.ndarray | None:
    """The tutorial's float mask (1.0 = masked) for the workload."""
    return None if inp.keep is None else (~inp.keep).astype(np.float32)


_GROUPED_NOTE = "; GQA: q heads as rows of their kv head (a free reshape)"


def make_tf_compat(inp: Inputs, threads: int) -> Peer:
    mask, grouped = _tf_mask(inp), _grouped_q(inp)
    if grouped is None:
        return None, _NO_GQA
    q, back = grouped
    fn = _reads(lambda: fm.compat.tf.scaled_dot_product_attention(q, inp.k, inp.v, mask),
                lambda r: back(r[0]))  # fmt: skip
    note = "the TF tutorial's function via fastmask.compat.tf (materialises the logits)"
    return fn, note + (_GROUPED_NOTE if q is not inp.q else "")


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
    mask, grouped = _tf_mask(inp), _grouped_q(inp)
    if grouped is None:
        return None, _NO_GQA
    q, back = grouped
    fn = _reads(lambda: tf_tutorial_numpy(q, inp.k, inp.v, mask), lambda r: back(r[0]))
    return fn, "the TF tutorial's function in plain NumPy" + (
        _GROUPED_NOTE if q is not inp.q else ""
    )


def _ort_session(graph, threads: int, contrib: bool = False):
    import onnxruntime as ort
    from onnx import helper

    opsets = [helper.make_opsetid("", 17)]
    if contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def make_onnxruntime_attention(inp: Inputs, threads: int) -> Peer:
    try:
        import onnxruntime  # noqa: F401
        from onnx import TensorProto, helper
    except ImportError:
        return None, "onnxruntime/onnx not installed (pip install 'fastmask[bench]')"
    k, v = inp.k, inp.v
    if inp.q.dtype != np.float32:
        return None, "float32 only here"
    grouped = _grouped_q(inp)
    if grouped is None:
        return None, _NO_GQA
    q, back = grouped  # MatMul broadcasts batch axes only: no grouped heads
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
    sess = _ort_session(graph, threads)
    feeds = {"q": q, "k": k, "v": v, "bias": bias}
    fn = _reads(lambda: sess.run(None, feeds), lambda r: back(r[0]))
    return fn, "ONNX Runtime MatMul + Mul + Add(mask*-1e9) + Softmax + MatMul" + (
        _GROUPED_NOTE if q is not inp.q else ""
    )


def _bld(a: np.ndarray) -> np.ndarray:
    """(B, H, L, D) -> (B, L, H*D), the contrib ops' layout (a copy, made once, untimed)."""
    b, h, length, d = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3).reshape(b, length, h * d))


def _bhld(o: np.ndarray, h: int) -> np.ndarray:
    b, length, hd = o.shape
    return o.reshape(b, length, h, hd // h).transpose(0, 2, 1, 3)


def make_onnxruntime_contrib(inp: Inputs, threads: int) -> Peer:
    """ONNX Runtime's fused ``com.microsoft`` MultiHeadAttention (GroupQueryAttention for GQA)."""
    try:
        import onnxruntime  # noqa: F401
        from onnx import TensorProto, helper
    except ImportError:
        return None, "onnxruntime/onnx not installed (pip install 'fastmask[bench]')"
    q, k, v = inp.q, inp.k, inp.v
    if q.dtype != np.float32 or q.ndim != 4:
        return None, "float32 (B, H, L, D) only here"
    if _groups(inp) > 1:
        return _onnxruntime_gqa(inp, threads)
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    feeds = {"query": _bld(q), "key": _bld(k), "value": _bld(v)}
    attrs, how = {"num_heads": h}, []
    if inp.window is not None or (inp.keep is not None and inp.lengths is None and not inp.causal):
        # MHA has no window option: the whole mask as an additive attention_bias
        # (batch or 1, 1, Lq, Lk) of 0 / -inf, built once. (-inf: no workload has a row
        # with nothing kept, which would come out NaN.)
        keep = inp.keep.reshape((1,) * (4 - inp.keep.ndim) + inp.keep.shape)
        shape = (keep.shape[0], 1, lq, lk)
        bias = np.where(np.broadcast_to(keep, shape), 0.0, -np.inf).astype(np.float32)
        feeds["attention_bias"] = bias
        how.append(f"attention_bias {shape} 0/-inf")
    else:
        if inp.lengths is not None and inp.side == "right":
            feeds["key_padding_mask"] = inp.lengths.astype(np.int32)  # (B,): valid lengths
            how.append("key_padding_mask = lengths")
        elif inp.lengths is not None:  # (B, Lk) of 1 = keep, 0 = padding
            keep = np.broadcast_to(inp.keep, (b, 1, 1, lk)).reshape(b, lk)
            feeds["key_padding_mask"] = keep.astype(np.int32)
            how.append("key_padding_mask (B, Lk)")
        if inp.causal:
            attrs["unidirectional"] = 1
            how.append("unidirectional=1")
    # Optional inputs are named by position; "" skips one (bias: the projections' bias).
    order = ["query", "key", "value", "bias", "key_padding_mask", "attention_bias"]
    names = [n if n in feeds else "" for n in order]
    while not names[-1]:
        names.pop()
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32}
    graph = helper.make_graph(
        [helper.make_node("MultiHeadAttention", names, ["out"], domain="com.microsoft", **attrs)],
        "mha",
        [helper.make_tensor_value_info(n, types[a.dtype], list(a.shape)) for n, a in feeds.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [b, lq, h * v.shape[-1]])],
    )
    sess = _ort_session(graph, threads, contrib=True)
    fn = _reads(lambda: sess.run(None, feeds), lambda r: _bhld(r[0], h))
    return fn, "ORT com.microsoft MultiHeadAttention, (B, L, H*D)" + "".join(", " + x for x in how)


def _onnxruntime_gqa(inp: Inputs, threads: int) -> Peer:
    """GroupQueryAttention, ORT's grouped-heads op: a causal step over a right-padded KV cache."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    q, k, v = inp.q, inp.k, inp.v
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if (
        lq != 1
        or inp.causal
        or inp.window is not None
        or (inp.keep is not None and inp.lengths is None)
    ):
        return None, "GroupQueryAttention serves decoding steps (Lq = 1) with key padding only"
    n = np.full(b, lk) if inp.lengths is None else inp.lengths.astype(np.int64)
    if n.min() < 1:
        return None, "GroupQueryAttention needs at least one key per sequence"
    # The op reads keys [0, n) of each sequence (right padding). The output does not depend
    # on the keys' order, so a left-padded cache is moved there once, outside the timing.
    start = lk - n if inp.side == "left" else np.zeros_like(n)
    cache_k, cache_v = np.zeros_like(k), np.zeros_like(v)
    for i in range(b):
        cache_k[i, :, : n[i]] = k[i, :, start[i] : start[i] + n[i]]
        cache_v[i, :, : n[i]] = v[i, :, start[i] : start[i] + n[i]]
    rows = np.arange(b)
    # This step's own key/value is each sequence's last one, which the op writes into the
    # cache at n - 1, where it already is: every repeat computes the same step.
    feeds = {
        "query": _bld(q),
        "key": np.ascontiguousarray(cache_k[rows, :, n - 1].reshape(b, 1, hk * d)),
        "value": np.ascontiguousarray(cache_v[rows, :, n - 1].reshape(b, 1, hk * d)),
        "seqlens_k": (n - 1).astype(np.int32),  # total lengths - 1
        "total_sequence_length": np.array(n.max(), np.int32),
    }
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    info = helper.make_tensor_value_info
    cache = [b, hk, lk, d]
    graph = helper.make_graph(
        [helper.make_node(
            "GroupQueryAttention",
            ["query", "key", "value", "past_key", "past_value", "seqlens_k",
             "total_sequence_length"],
            ["out", "present_key", "present_value"],
            domain="com.microsoft", num_heads=hq, kv_num_heads=hk,
        )],
        "gqa",
        [info("query", f32, [b, 1, hq * d]), info("key", f32, [b, 1, hk * d]),
         info("value", f32, [b, 1, hk * d]), info("past_key", f32, cache),
         info("past_value", f32, cache), info("seqlens_k", i32, [b]),
         info("total_sequence_length", i32, [])],
        [info("out", f32, [b, 1, hq * d]), info("present_key", f32, cache),
         info("present_value", f32, cache)],
    )  # fmt: skip
    sess = _ort_session(graph, threads, contrib=True)
    # past and present bound to one buffer each, as decoders run it: the op then updates
    # the cache in place instead of copying all of it on every call.
    io = sess.io_binding()
    for name, a in feeds.items():
        io.bind_cpu_input(name, a)
    io.bind_output("out")
    for past, present, a in (("past_key", "present_key", cache_k),
                             ("past_value", "present_value", cache_v)):  # fmt: skip
        buf = ort.OrtValue.ortvalue_from_numpy(a)
        io.bind_ortvalue_input(past, buf)
        io.bind_ortvalue_output(present, buf)
    fn = _reads(lambda: sess.run_with_iobinding(io),
                lambda _: _bhld(io.get_outputs()[0].numpy(), hq))  # fmt: skip
    return fn, (
        "ORT com.microsoft GroupQueryAttention (MultiHeadAttention has no GQA): one decoding "
        "step over a KV cache shared past/present; left padding moved to the op's right "
        "padding, untimed"
    )


def make_openvino_sdpa(inp: Inputs, threads: int) -> Peer:
    """OpenVINO's opset13 ScaledDotProductAttention, compiled for the CPU."""
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None, "openvino not installed (pip install 'fastmask[bench]')"
    q, k, v = inp.q, inp.k, inp.v
    if q.dtype != np.float32:
        return None, "float32 only here"
    out_shape = (*q.shape[:-1], v.shape[-1])
    keep = None if inp.causal else inp.keep
    g = _groups(inp)
    notes = ["causal=True" if inp.causal else "boolean attention_mask" if keep is not None
             else "no mask"]  # fmt: skip
    if g > 1:
        # GQA without repeating k/v: a group axis, q (B, Hk, G, Lq, D) against k/v
        # (B, Hk, 1, Lk, D), which the op's numpy-style batch broadcasting serves.
        *lead, _, lq, d = q.shape
        hk = k.shape[-3]
        q = q.reshape(*lead, hk, g, lq, d)
        k, v = k[..., None, :, :], v[..., None, :, :]
        if keep is not None:
            keep = keep.reshape((1,) * (4 - keep.ndim) + keep.shape)
            kb, kh, kq, kk = keep.shape
            keep = keep.reshape(kb, 1, 1, kq, kk) if kh == 1 else keep.reshape(kb, hk, g, kq, kk)
        notes.append("GQA as a broadcast group axis (no k/v repeat)")
    inputs = [np.ascontiguousarray(a) for a in (q, k, v)]
    if keep is not None:
        inputs.append(np.ascontiguousarray(keep))  # True = keep, as in PyTorch
    params = [
        ops.parameter(a.shape, ov.Type.boolean if a.dtype == bool else ov.Type.f32, name=n)
        for n, a in zip(("q", "k", "v", "mask"), inputs, strict=False)
    ]
    model = ov.Model([ops.scaled_dot_product_attention(*params, causal=inp.causal)], params)
    # f32 precision: on CPUs with bf16 (AVX512_BF16, AMX) OpenVINO would otherwise run a
    # float32 model in bfloat16.
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    for i, a in enumerate(inputs):  # set once: the timed call copies nothing in
        request.set_input_tensor(i, ov.Tensor(a, shared_memory=True))
    fn = _reads(lambda: request.infer(),
                lambda _: request.get_output_tensor(0).data.reshape(out_shape))  # fmt: skip
    return fn, "OpenVINO ScaledDotProductAttention (opset13), " + ", ".join(notes)
