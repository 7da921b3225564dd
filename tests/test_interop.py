"""Interop claims of docs/interop.md: torch CPU tensors zero-copy, JAX arrays read in place.

torch comes with the ``bench`` extra, JAX with the ``interop`` extra; each test skips
without its library. Copies are detected with tracemalloc, to which NumPy reports
every allocation of array data.
"""

from __future__ import annotations

import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest

import fastmask as fm
from fastmask.reference import masked_softmax_reference


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


@contextmanager
def allocations():
    """Yield a list that receives the peak bytes NumPy allocated inside the block."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    peak: list[int] = []
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1] - base)
        if not was_tracing:
            tracemalloc.stop()


def reference_attention(q, k, v, keep=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    w = masked_softmax_reference(s, keep)
    return w @ v


# --- PyTorch CPU tensors ----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_torch_tensor_in_tensor_out(torch, dtype):
    tdt = getattr(torch, dtype)
    x = torch.randn(2, 3, 8, 8).to(tdt)
    y = fm.masked_softmax(x, fm.masks.causal())
    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.shape == x.shape
    expected = fm.masked_softmax(x.numpy(), fm.masks.causal())
    np.testing.assert_array_equal(y.numpy(), expected)


def test_torch_input_and_out_are_not_copied(torch):
    x = torch.randn(4, 8, 64, 64)
    nbytes = x.numel() * x.element_size()
    o = torch.empty_like(x)
    fm.masked_softmax(x, fm.masks.causal(), out=o)  # warm up routing
    for xi in (x, x.transpose(-1, -2)):  # a strided view too
        with allocations() as peak:
            r = fm.masked_softmax(xi, fm.masks.causal(), out=o)
        assert r is o
        assert peak[0] < nbytes / 10, f"{peak[0]} bytes allocated: a copy of x or out"


def test_torch_result_is_the_only_allocation(torch):
    x = torch.randn(4, 8, 64, 64)
    nbytes = x.numel() * x.element_size()
    fm.masked_softmax(x)
    with allocations() as peak:
        y = fm.masked_softmax(x)
    assert isinstance(y, torch.Tensor)
    # One output array, wrapped by torch.from_numpy: no copy of x, none of the result.
    assert nbytes <= peak[0] < 1.5 * nbytes
    assert y.numpy().ctypes.data == y.data_ptr()


def test_torch_out_tensor_written_in_place(torch):
    x = torch.randn(2, 4, 16)
    expected = fm.masked_softmax(x.numpy(), fm.masks.padding([16, 5]))
    o = torch.zeros_like(x)
    ptr = o.data_ptr()
    r = fm.masked_softmax(x, fm.masks.padding([16, 5]), out=o)
    assert r is o and o.data_ptr() == ptr
    np.testing.assert_array_equal(o.numpy(), expected)
    ptr = x.data_ptr()
    r = fm.masked_softmax(x, fm.masks.padding([16, 5]), out=x)
    assert r is x and x.data_ptr() == ptr
    np.testing.assert_array_equal(x.numpy(), expected)


def test_torch_out_for_a_numpy_x_and_numpy_out_for_a_tensor(torch):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    o = torch.empty(3, 5)
    assert fm.masked_softmax(x, out=o) is o
    on = np.empty((3, 5), np.float32)
    assert fm.masked_softmax(torch.from_numpy(x), out=on) is on
    np.testing.assert_array_equal(o.numpy(), on)


def test_torch_mask_and_bias_tensors_are_accepted(torch):
    x = torch.randn(2, 3, 4, 6)
    keep = torch.rand(2, 1, 1, 6) < 0.7
    bias = torch.randn(1, 3, 1, 6)
    y = fm.masked_softmax(x, keep, bias=bias)
    expected = fm.masked_softmax(x.numpy(), keep.numpy(), bias=bias.numpy())
    np.testing.assert_array_equal(y.numpy(), expected)
    # Only x decides the result type: a NumPy x with tensor operands gives NumPy.
    assert type(fm.masked_softmax(x.numpy(), keep)) is np.ndarray
    with pytest.raises(TypeError, match="masks.drop"):
        fm.masked_softmax(x, keep.float())  # a float mask is never guessed


def test_torch_attention_returns_tensors_and_matches_sdpa(torch):
    q, k, v = torch.randn(2, 8, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    key_padding_mask = torch.zeros(2, 12, dtype=torch.bool)
    key_padding_mask[1, 7:] = True
    mask = fm.masks.drop(key_padding_mask[:, None, None, :])
    out, weights = fm.attention(q, k, v, mask, return_weights=True)
    assert isinstance(out, torch.Tensor) and isinstance(weights, torch.Tensor)
    assert weights.shape == (2, 8, 12, 12) and bool((weights[1, ..., 7:] == 0).all())
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=~key_padding_mask[:, None, None, :], enable_gqa=True
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_requires_grad_is_a_type_error(torch):
    with pytest.raises(TypeError, match="requires grad"):
        fm.masked_softmax(torch.randn(2, 3, requires_grad=True))
    with pytest.raises(TypeError, match="requires grad"):
        fm.masked_softmax(torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True))
    fm.masked_softmax(torch.randn(2, 3, requires_grad=True).detach())
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64"):
        fm.masked_softmax(torch.ones(2, 3, dtype=torch.int32))


def test_torch_bfloat16_is_read_in_place_and_returned_as_bfloat16(torch):
    x = torch.randn(4, 8, 64, 64).to(torch.bfloat16)
    y = fm.masked_softmax(x, fm.masks.causal())
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
    expected = torch.softmax(
        x.float().masked_fill(~torch.ones(64, 64).tril().bool(), -torch.inf), -1
    )
    torch.testing.assert_close(y.float(), expected, atol=1e-5, rtol=2**-8)
    out = torch.empty_like(x)
    assert fm.masked_softmax(x, fm.masks.causal(), out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, y, atol=0, rtol=0)


# --- JAX arrays -------------------------------------------------------------------


def test_jax_array_is_read_in_place(jax):
    jnp = jax.numpy
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 64, 64), dtype=np.float32))
    view = np.asarray(x)
    assert view.ctypes.data == x.unsafe_buffer_pointer() and not view.flags.writeable
    fm.masked_softmax(x, fm.masks.causal())
    with allocations() as peak:
        fm.masked_softmax(x, fm.masks.causal())
    assert x.nbytes <= peak[0] < 1.5 * x.nbytes  # the output only: x is not copied


def test_jax_in_numpy_out(jax):
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 8), dtype=np.float32))
    y = fm.masked_softmax(x, fm.masks.causal())
    assert type(y) is np.ndarray and y.dtype == np.float32
    np.testing.assert_array_equal(y, fm.masked_softmax(np.asarray(x), fm.masks.causal()))
    keep = jnp.tril(jnp.ones((8, 8), bool))
    expected = jax.nn.softmax(jnp.where(keep, x, -jnp.inf), axis=-1)
    np.testing.assert_allclose(jnp.asarray(y), expected, atol=1e-6)
    # float16 in, float16 out
    assert fm.masked_softmax(x.astype(jnp.float16)).dtype == np.float16


def test_jax_mask_arrays_follow_fastmask_conventions(jax):
    jnp = jax.numpy
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6), dtype=np.float32))
    keep = jnp.asarray([[True] * 6, [True] * 3 + [False] * 3])
    y = fm.masked_softmax(x, keep)
    assert np.all(y[1, 3:] == 0)
    with pytest.raises(TypeError, match="masks.keep"):
        fm.masked_softmax(x, keep.astype(jnp.float32))


def test_jax_out_is_value_error(jax):
    x = jax.numpy.ones((2, 3), jax.numpy.float32)
    with pytest.raises(ValueError, match="read-only"):
        fm.masked_softmax(x, out=x)
    out = np.empty((2, 3), np.float32)
    assert fm.masked_softmax(x, out=out) is out


def test_jax_bfloat16_in_numpy_bfloat16_out(jax):
    x = jax.numpy.asarray([[0.0, 1.0, 2.0]], jax.numpy.bfloat16)
    y = fm.masked_softmax(x)
    assert type(y) is np.ndarray and y.dtype == np.asarray(x).dtype
    expected = jax.nn.softmax(x.astype(jax.numpy.float32), axis=-1)
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=1e-5, rtol=2**-8)


def test_jax_attention_matches_dot_product_attention(jax):
    jnp = jax.numpy
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 10, 4, 8), dtype=np.float32))  # JAX: (B, L, H, D)
    keep = rng.random((2, 1, 10, 10)) < 0.7
    keep[..., 0] = True  # no fully masked row: JAX gives a uniform row there
    keep = jnp.asarray(keep)
    ref = jax.nn.dot_product_attention(q, q, q, mask=keep)
    qh = jnp.swapaxes(q, 1, 2)
    out = fm.attention(qh, qh, qh, keep)
    assert type(out) is np.ndarray
    np.testing.assert_allclose(np.swapaxes(out, 1, 2), ref, atol=1e-5)
    np.testing.assert_allclose(out, reference_attention(qh, qh, qh, keep), atol=1e-5)


def test_jax_pure_callback_under_jit_and_vmap(jax):
    jnp = jax.numpy
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 5), dtype=np.float32))

    def causal_softmax(a):
        return jax.pure_callback(
            lambda b: fm.masked_softmax(b, fm.masks.causal()),
            jax.ShapeDtypeStruct(a.shape, a.dtype),
            a,
            vmap_method="expand_dims",
        )

    expected = fm.masked_softmax(np.asarray(x), fm.masks.causal())
    np.testing.assert_array_equal(jax.jit(causal_softmax)(x), expected)
    np.testing.assert_array_equal(jax.vmap(causal_softmax)(x), expected)
