"""The plugin's strategies, fused (numba) and materialised (numpy), against NumPy definitions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastmask as fm
import fastmask_masks_extra
import fastmask_masks_extra.plugin
from fastmask.reference import masked_softmax_reference
from fastmask_masks_extra import alibi_slopes

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("numba", "numpy")
TOL = {np.dtype(np.float32): {"atol": 1e-6, "rtol": 1e-5}, np.dtype(np.float64): {"atol": 1e-12}}


def check(y, x, keep=None, bias=None):
    ref = masked_softmax_reference(x, keep, bias)
    np.testing.assert_allclose(y.astype(np.float64), ref, **TOL[y.dtype])
    if keep is not None:
        assert np.all(y[~np.broadcast_to(keep, x.shape)] == 0)


def loops(fn, shape):
    """``fn(q, k)`` evaluated in Python for every query/key pair, broadcast to ``shape``."""
    q, n = shape[-2], shape[-1]
    grid = np.array([[bool(fn(i, j)) for j in range(n)] for i in range(q)])
    return np.broadcast_to(grid, shape)


def test_strategies_reachable_through_fastmask_masks_only_while_registered():
    with pytest.raises(AttributeError):
        fm.masks.strided  # noqa: B018
    name = fm.plugins.register(fastmask_masks_extra.plugin, name="masks-extra-tmp")
    try:
        assert fm.masks.alibi is fastmask_masks_extra.alibi
        assert fm.masks.strided is fastmask_masks_extra.strided
        assert fm.masks.global_local is fastmask_masks_extra.global_local
        info = {p.name: p for p in fm.plugins.list_plugins()}["masks-extra-tmp"]
        assert set(info.mask_strategies) == {"alibi", "strided", "global_local"}
        assert not info.builtin
    finally:
        fm.plugins.unregister(name=name)
    with pytest.raises(AttributeError):
        fm.masks.global_local  # noqa: B018


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_allclose(alibi_slopes(4), 2.0 ** (-2.0 * np.arange(1, 5)))
    # 12 heads: the 8 slopes of 8 heads, then the odd ones of 16 heads
    expected = np.r_[2.0 ** -np.arange(1, 9), 2.0 ** -(np.arange(4) + 0.5)]
    np.testing.assert_allclose(alibi_slopes(12), expected)
    assert alibi_slopes(1).tolist() == [2.0**-8]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alibi_equals_its_bias(extra, backend, dtype, rng):
    x = rng.standard_normal((2, 4, 9, 9)).astype(dtype)
    strategy = extra.alibi() & fm.masks.causal()
    keep = fm.masks.causal().to_dense(x.shape)
    assert strategy.to_dense(x.shape).tolist() == keep.tolist()
    bias = extra.alibi().bias(x.shape)
    assert bias[0, 1, 5, 2] == -3 * 2.0**-4  # slope of head 1 of 4, distance 3
    check(fm.masked_softmax(x, strategy, backend=backend), x, keep, bias)
    # explicit slopes, with a bias and a scale before it
    slopes = np.array([0.3, 0.0, -0.1, 1.0])
    extra_bias = rng.standard_normal((1, 4, 1, 9)).astype(dtype)
    y = fm.masked_softmax(x, extra.alibi(slopes), bias=extra_bias, scale=0.5, backend=backend)
    ref = masked_softmax_reference(x * 0.5 + extra_bias + extra.alibi(slopes).bias(x.shape))
    np.testing.assert_allclose(y, ref, **TOL[y.dtype])


def test_alibi_under_kv_cache_alignment(extra, rng):
    # Lq < Lk, diagonal bottom-right: the bias is linear in k, so the row's
    # constant shift cancels and the paper's -slope * (distance) is reproduced.
    x = rng.standard_normal((1, 2, 3, 8)).astype(np.float64)
    causal = fm.masks.causal(align="bottom-right")
    slopes = alibi_slopes(2)
    qpos = np.arange(3)[:, None] + 5
    paper = -slopes[:, None, None] * (qpos - np.arange(8)[None, :])[None]
    y = fm.masked_softmax(x, extra.alibi() & causal, backend="numba")
    check(y, x, causal.to_dense(x.shape), paper[None])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride,local", [(3, None), (4, 2), (1, 1), (5, 9)])
def test_strided(extra, backend, stride, local, rng):
    x = rng.standard_normal((2, 3, 13, 13)).astype(np.float32)
    loc = stride if local is None else local
    keep = loops(lambda i, j: j <= i and (i - j < loc or (i - j) % stride == 0), x.shape)
    strategy = extra.strided(stride, local=local)
    np.testing.assert_array_equal(strategy.to_dense(x.shape), keep)
    check(fm.masked_softmax(x, strategy, backend=backend), x, keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "window,tokens,lq,lk",
    [(2, 1, 11, 11), (3, [0, 5, 20], 11, 11), (1, 0, 7, 7), (2, [1, 8], 4, 10), (4, 2, 10, 4)],
)
def test_global_local(extra, backend, window, tokens, lq, lk, rng):
    x = rng.standard_normal((2, lq, lk)).astype(np.float64)
    g = set(range(tokens)) if np.ndim(tokens) == 0 else set(tokens)
    keep = loops(lambda i, j: abs(i - j) < window or i in g or j in g, x.shape)
    strategy = extra.global_local(window, tokens)
    np.testing.assert_array_equal(strategy.to_dense(x.shape), keep)
    check(fm.masked_softmax(x, strategy, backend=backend), x, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compositions(extra, backend, rng):
    x = rng.standard_normal((3, 2, 12, 12)).astype(np.float32)
    cases = [
        extra.strided(4) & fm.masks.padding([12, 5, 0]),
        extra.global_local(2, [0]) & fm.masks.causal(),
        extra.alibi() & extra.strided(3, local=2) & fm.masks.keep(np.arange(12) != 4),
        extra.global_local(3, 1) & fm.masks.sliding_window(6) & extra.alibi(),
    ]
    for strategy in cases:
        keep = strategy.to_dense(x.shape)
        has_alibi = any(isinstance(p, fastmask_masks_extra.ALiBi) for p in strategy.parts)
        bias = extra.alibi().bias(x.shape) if has_alibi else None
        check(fm.masked_softmax(x, strategy, backend=backend), x, keep, bias)


def test_cython_declines_with_a_reason(extra, rng):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="numba backend"):
        fm.masked_softmax(x, extra.strided(2), backend="cython")
    text = str(fm.explain(x, extra.strided(2)))
    assert "numba backend" in text


def test_bad_parameters(extra):
    with pytest.raises(ValueError, match=">= 1"):
        extra.strided(0)
    with pytest.raises(TypeError, match="integer"):
        extra.strided(2.5)
    with pytest.raises(ValueError, match=">= 0"):
        extra.global_local(2, [-1])
    with pytest.raises(TypeError, match="count or"):
        extra.global_local(2, True)
    with pytest.raises(ValueError, match="1-D"):
        extra.alibi(np.ones((2, 2)))
    with pytest.raises(ValueError, match="got 3 slopes but the logits have 4 heads"):
        fm.masked_softmax(np.zeros((1, 4, 2, 2), np.float32), extra.alibi([1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------
# discovery through the entry point, in a fresh interpreter


def _fake_install(where: Path) -> None:
    """A dist-info that declares the plugin's entry point, as pip would write it."""
    info = where / "fastmask_masks_extra-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fastmask-masks-extra\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[fastmask]\nmasks-extra = fastmask_masks_extra.plugin\n"
    )


def _run(where: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTMASK_LOAD_PLUGINS", None)  # load every entry point
    paths = [str(where), str(PLUGIN_ROOT), str(Path(fm.__file__).resolve().parents[1])]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_found_through_the_entry_point(tmp_path):
    _fake_install(tmp_path)
    out = _run(tmp_path, "-m", "fastmask", "info")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "masks-extra" in ln)
    assert "(external)" in line
    for name in ("alibi", "strided", "global_local"):
        assert f"mask strategy {name}" in line
    code = (
        "import numpy as np, fastmask as fm\n"
        "m = fm.masks.strided(2) & fm.masks.alibi()\n"
        "y = fm.masked_softmax(np.zeros((1, 2, 4, 4), np.float32), m, backend='numba')\n"
        "print(fm.masks.strided(2).to_dense((4, 4)).astype(int).tolist(), y.shape)\n"
    )
    out = _run(tmp_path, "-c", code)
    assert out.returncode == 0, out.stderr
    assert "[[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]] (1, 2, 4, 4)" in out.stdout
