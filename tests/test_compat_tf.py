"""fastmask.compat.tf: the TensorFlow tutorial's attention, reproduced to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

import fastmask as fm
from fastmask.compat import tf


def tutorial(q, k, v, mask):
    """The tutorial's function, transliterated to NumPy float32 line by line."""
    matmul_qk = np.matmul(q, np.swapaxes(k, -1, -2))
    dk = np.float32(k.shape[-1])
    scaled_attention_logits = matmul_qk / np.sqrt(dk)
    if mask is not None:
        scaled_attention_logits = scaled_attention_logits + (
            np.asarray(mask, np.float32) * np.float32(-1e9)
        )
    shifted = scaled_attention_logits - scaled_attention_logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    attention_weights = e / e.sum(-1, keepdims=True)
    return np.matmul(attention_weights, v), attention_weights


TEMP_K = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10], [0, 0, 10]], np.float32)
TEMP_V = np.array([[1, 0], [10, 0], [100, 5], [1000, 6]], np.float32)


@pytest.mark.parametrize(
    ("temp_q", "output", "weights"),
    [
        ([[0, 10, 0]], [[10, 0]], [[0, 1, 0, 0]]),
        ([[0, 0, 10]], [[550, 5.5]], [[0, 0, 0.5, 0.5]]),
        ([[10, 10, 0]], [[5.5, 0]], [[0.5, 0.5, 0, 0]]),
        (
            [[0, 0, 10], [0, 10, 0], [10, 10, 0]],
            [[550, 5.5], [10, 0], [5.5, 0]],
            [[0, 0, 0.5, 0.5], [0, 1, 0, 0], [0.5, 0.5, 0, 0]],
        ),
    ],
)
def test_the_tutorials_printed_examples(temp_q, output, weights):
    q = np.array(temp_q, np.float32)
    out, w = tf.scaled_dot_product_attention(q, TEMP_K, TEMP_V, None)
    assert out.dtype == np.float32 and w.dtype == np.float32
    np.testing.assert_allclose(w, weights, atol=1e-6)
    np.testing.assert_allclose(out, output, rtol=1e-6, atol=1e-5)
    ref_out, ref_w = tutorial(q, TEMP_K, TEMP_V, None)
    np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-5)


def _batch(rng, b=3, h=2, lq=7, lk=9, d=16, dtype=np.float32):
    q = rng.standard_normal((b, h, lq, d)).astype(dtype)
    k = rng.standard_normal((b, h, lk, d)).astype(dtype)
    v = rng.standard_normal((b, h, lk, 5)).astype(dtype)
    return q, k, v


def test_padding_and_look_ahead_masks_match_the_transliteration():
    rng = np.random.default_rng(0)
    q, k, v = _batch(rng, lq=9)
    seq = np.array([[5, 3, 8, 1, 2, 9, 4, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0, 0],
                    [7, 7, 7, 7, 7, 7, 7, 7, 7]])  # fmt: skip
    pad = tf.create_padding_mask(seq)
    combined = np.maximum(pad, tf.create_look_ahead_mask(9))
    for mask in (None, pad, combined):
        out, w = tf.scaled_dot_product_attention(q, k, v, mask)
        ref_out, ref_w = tutorial(q, k, v, mask)
        np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    # Masked keys get weight exp(-1e9)-ish: exactly 0 in float32, as in TensorFlow.
    _, w = tf.scaled_dot_product_attention(q, k, v, pad)
    assert np.all(w[1, :, :, 3:] == 0)


def test_fully_masked_row_uniform_where_logits_agree_at_1e9():
    # Logits 0, 10, 20: -1e9 + s rounds to -1e9 for all three (float32 spacing at 1e9 is 64).
    q = np.ones((1, 1), np.float32)
    k = np.array([[0], [10], [20]], np.float32)
    v = np.array([[1, 0], [0, 1], [3, 3]], np.float32)
    mask = np.ones((1, 3), np.float32)  # every key masked
    out, w = tf.scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(w, [[1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(out, [[4 / 3, 4 / 3]], rtol=1e-6)
    _, ref_w = tutorial(q, k, v, mask)
    np.testing.assert_allclose(w, ref_w, rtol=1e-6)
    # fastmask.attention defines the same row as "nothing to attend to": zeros.
    assert np.all(fm.attention(q, k, v, fm.masks.drop(mask), scale=1.0) == 0)


def test_fully_masked_row_one_hot_where_logits_differ_by_more_than_64():
    # Logits 0, 100, 200 -> -1e9, -999999872, -999999808 in float32: differences of 64 and 128.
    q = np.ones((1, 1), np.float32)
    k = np.array([[0], [100], [200]], np.float32)
    v = np.array([[1, 0], [0, 1], [3, 3]], np.float32)
    mask = np.ones((1, 3), np.float32)
    out, w = tf.scaled_dot_product_attention(q, k, v, mask)
    assert w[0, 2] == 1.0 and w[0, 0] == 0.0 and 0 < w[0, 1] < 1e-27  # exp(-64), exp(-192)
    np.testing.assert_allclose(out, [[3, 3]], rtol=1e-6)
    ref_out, ref_w = tutorial(q, k, v, mask)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=0)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    # Not uniform, although every key is masked: TensorFlow's behaviour, kept.
    assert not np.allclose(w, 1 / 3)


def test_mask_as_bool_or_strategy():
    rng = np.random.default_rng(1)
    q, k, v = _batch(rng, lq=9)
    seq = np.array([[5, 3, 8, 1, 2, 9, 4, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0, 0],
                    [7, 7, 7, 7, 7, 7, 7, 7, 7]])  # fmt: skip
    pad = tf.create_padding_mask(seq)
    expected = tf.scaled_dot_product_attention(q, k, v, pad)
    for mask in (pad.astype(bool), tf.padding_strategy(seq)):
        got = tf.scaled_dot_product_attention(q, k, v, mask)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)


def test_mask_helpers():
    seq = np.array([[7, 6, 0, 0, 1, 0], [1, 2, 3, 0, 0, 0]])
    pad = tf.create_padding_mask(seq)
    assert pad.dtype == np.float32 and pad.shape == (2, 1, 1, 6)
    np.testing.assert_array_equal(pad[:, 0, 0], [[0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]])
    la = tf.create_look_ahead_mask(3)
    assert la.dtype == np.float32
    np.testing.assert_array_equal(la, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])

    shape = (2, 4, 6, 6)
    s = tf.padding_strategy(seq)
    assert isinstance(s, fm.masks.DenseMask)  # a zero inside the first sequence: not a tail
    np.testing.assert_array_equal(s.to_dense(shape), np.broadcast_to(pad == 0, shape))
    right = np.array([[7, 6, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    s = tf.padding_strategy(right)
    assert isinstance(s, fm.masks.Padding)  # intervals: padded keys are skipped
    np.testing.assert_array_equal(
        s.to_dense(shape), np.broadcast_to(tf.create_padding_mask(right) == 0, shape)
    )
    la_s = tf.look_ahead_strategy()
    np.testing.assert_array_equal(la_s.to_dense((6, 6)), tf.create_look_ahead_mask(6) == 0)


def test_one_line_migration_to_fastmask_attention():
    rng = np.random.default_rng(2)
    q, k, v = _batch(rng, lq=6, lk=6)
    tar = np.array([[4, 5, 6, 1, 0, 0], [3, 3, 3, 3, 3, 3], [9, 8, 0, 0, 0, 0]])
    combined = np.maximum(tf.create_padding_mask(tar), tf.create_look_ahead_mask(6))
    out_tf, _ = tf.scaled_dot_product_attention(q, k, v, combined)
    out_fm = fm.attention(q, k, v, fm.masks.drop(combined))
    np.testing.assert_allclose(out_fm, out_tf, rtol=1e-5, atol=1e-6)
    out_s = fm.attention(q, k, v, tf.padding_strategy(tar) & tf.look_ahead_strategy())
    np.testing.assert_allclose(out_s, out_tf, rtol=1e-5, atol=1e-6)
    assert "fastmask.attention(q, k, v, fastmask.masks.drop(mask))" in tf.__doc__


def test_float64_and_validation():
    rng = np.random.default_rng(3)
    q, k, v = _batch(rng, dtype=np.float64)
    out, w = tf.scaled_dot_product_attention(q, k, v, None)
    ref_out, ref_w = tutorial(q, k, v, None)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=1e-12, atol=1e-15)
    with pytest.raises(TypeError, match="same dtype"):
        tf.scaled_dot_product_attention(q, k.astype(np.float32), v, None)
    with pytest.raises(TypeError, match="float"):
        tf.scaled_dot_product_attention(q.astype(int), k.astype(int), v.astype(int), None)
    with pytest.raises(ValueError, match="seq"):
        tf.create_padding_mask(np.zeros(3))
