"""A mask object reused across calls: its plan is remembered only when that is safe."""

from __future__ import annotations

import numpy as np
import pytest

import fastmask as fm
from fastmask.masks import MaskPlan, MaskStrategy
from fastmask.reference import masked_softmax_reference


def test_a_reused_strategy_follows_the_shape_of_each_call(backend):
    rng = np.random.default_rng(0)
    mask = fm.masks.causal() & fm.masks.padding([5, 3])
    for q, n in [(4, 6), (6, 6), (4, 6), (2, 9)]:
        x = rng.standard_normal((2, 3, q, n)).astype(np.float32)
        got = fm.masked_softmax(x, mask, backend=backend)
        want = masked_softmax_reference(x, keep=mask.to_dense(x.shape))
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fm.masks.padding([2, 3]),
        lambda: fm.masks.prefix_lm([1, 2]),
        lambda: fm.masks.segments([[0, 0, 1, 1]]),
    ],
    ids=["padding", "prefix_lm", "segments"],
)
def test_built_in_strategies_cannot_be_changed_after_construction(make):
    strategy = make()
    arrays = [v for v in vars(strategy).values() if isinstance(v, np.ndarray)]
    assert arrays and not any(a.flags.writeable for a in arrays)
    with pytest.raises(ValueError, match="read-only"):
        arrays[0][0] = 1


class _Window(MaskStrategy):
    """A third-party strategy whose data may change between calls (not immutable)."""

    def __init__(self, upto: int) -> None:
        self.upto = upto

    def plan(self, shape):
        return MaskPlan(lo=np.zeros((1, 1, 1), np.int64), hi=np.full((1, 1, 1), self.upto))

    def _dense(self, shape):
        return np.arange(shape[-1]) < self.upto


def test_a_mutable_plugin_strategy_is_planned_again_on_every_call(backend):
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 8)).astype(np.float32)
    mask = _Window(3)
    first = fm.masked_softmax(x, mask, backend=backend)
    mask.upto = 6
    second = fm.masked_softmax(x, mask, backend=backend)
    assert np.all(first[..., 3:] == 0) and np.all(second[..., 3:6] > 0)
    np.testing.assert_allclose(
        second, masked_softmax_reference(x, keep=mask.to_dense(x.shape)), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("shape", [(2, 2, 0, 4), (2, 2, 3, 0), (0, 2, 3, 4)])
def test_interval_bounds_of_empty_axes(backend, shape):
    mask = fm.masks.causal() & fm.masks.padding(np.full(shape[0], min(shape[-1], 2)))
    y = fm.masked_softmax(np.zeros(shape, np.float32), mask, backend=backend)
    assert y.shape == shape


def test_a_pickled_strategy_leaves_its_remembered_plan_behind():
    import pickle

    mask = fm.masks.causal() & fm.masks.padding([3, 5])
    x = np.zeros((2, 4, 64, 64), np.float32)
    fm.masked_softmax(x, mask)
    assert "_fastmask_plan" in vars(mask)
    copy = pickle.loads(pickle.dumps(mask))
    assert "_fastmask_plan" not in vars(copy)
    np.testing.assert_array_equal(fm.masked_softmax(x, copy), fm.masked_softmax(x, mask))
