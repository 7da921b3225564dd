"""The router and the plugin API: forcing, explain, costs, caching, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
from conftest import BackendsPlugin

import fastmask as fm
from fastmask import router
from fastmask.plugins import PluginWarning


class ToyBackend(fm.Backend):
    """Copies the numpy backend's answer; its cost is whatever the test says."""

    name = "toy"
    description = "test backend"

    def __init__(self, cost: float, ok: bool = True, fail: bool = False):
        self.cost, self.ok, self.fail = cost, ok, fail
        self.checks = 0
        self.runs = 0

    def check(self, request):
        self.checks += 1
        if not self.ok:
            return fm.Verdict.no("toy refuses everything")
        return fm.Verdict(True, "toy estimate", self.cost)

    def masked_softmax(self, request):
        self.runs += 1
        if self.fail:
            raise RuntimeError("toy kernel exploded")
        fm.plugins.backends()["numpy"].masked_softmax(request)


@pytest.fixture
def toy():
    created = []

    def make(**kw):
        backend = ToyBackend(**kw)
        plugin = BackendsPlugin(backend)
        fm.plugins.register(plugin, name=f"toy-{len(created)}")
        created.append(plugin)
        return backend

    try:
        yield make
    finally:
        for plugin in created:
            fm.plugins.unregister(plugin)


X = np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)


def test_builtin_backends_register_through_hooks():
    infos = {p.name: p for p in fm.plugins.list_plugins()}
    for name in ("numpy", "numba", "cython"):
        (owner,) = [p for p in infos.values() if name in p.backends]
        assert owner.builtin
    assert fm.plugins.manager.hook.fastmask_backends.get_hookimpls()


def test_forced_backends_agree(backend):
    y = fm.masked_softmax(X, fm.masks.causal(), backend=backend)
    ref = fm.masked_softmax(X, fm.masks.causal(), backend="numpy")
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_cheap_toy_wins_and_expensive_toy_loses(toy):
    cheap = toy(cost=1e-9)
    y = fm.masked_softmax(X)
    assert cheap.runs == 1
    np.testing.assert_allclose(y, fm.masked_softmax(X, backend="numpy"), atol=1e-7)
    assert fm.explain(X).chosen == "toy"


def test_expensive_toy_loses(toy):
    costly = toy(cost=1e12)
    fm.masked_softmax(X)
    assert costly.runs == 0
    assert fm.explain(X).chosen != "toy"
    fm.masked_softmax(X, backend="toy")  # but it can be forced
    assert costly.runs == 1


def test_unable_backend_is_skipped_and_forcing_it_says_why(toy):
    refusing = toy(cost=0.0, ok=False)
    fm.masked_softmax(X)
    assert refusing.runs == 0
    with pytest.raises(ValueError, match="toy refuses everything"):
        fm.masked_softmax(X, backend="toy")


def test_decisions_are_cached_per_signature(toy):
    backend = toy(cost=1e-9)
    for _ in range(5):
        fm.masked_softmax(X)
    assert backend.checks == 1 and backend.runs == 5
    fm.masked_softmax(X[:1])  # a new signature is routed afresh
    assert backend.checks == 2


def test_routing_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(router, "MAX_CACHED_DECISIONS", 8)
    for n in range(1, 30):
        fm.masked_softmax(np.zeros((1, n), np.float32))
    assert len(router._cache) <= 8


def test_runtime_failure_is_reported_not_hidden(toy):
    toy(cost=1e-9, fail=True)
    with pytest.raises(fm.BackendError, match="toy.*exploded") as info:
        fm.masked_softmax(X)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_hook_that_raises_warns_and_others_go_on():
    class Broken:
        @fm.hookimpl
        def fastmask_backends(self):
            raise RuntimeError("cannot start")

    plugin = Broken()
    fm.plugins.register(plugin, name="broken-hook")
    try:
        with pytest.warns(PluginWarning, match="broken-hook.*cannot start"):
            names = list(fm.plugins.backends())
        assert "numpy" in names
        y = fm.masked_softmax(X)
        assert y.shape == X.shape
    finally:
        fm.plugins.unregister(plugin)


@pytest.mark.parametrize("returned", ["abc", 42, [42], [None], {"x": 1}])
def test_hook_returning_the_wrong_kind_of_object_warns_and_is_skipped(returned):
    class Odd:
        @fm.hookimpl
        def fastmask_backends(self):
            return returned

        @fm.hookimpl
        def fastmask_mask_strategies(self):
            return returned

    plugin = Odd()
    fm.plugins.register(plugin, name="odd-hook")
    try:
        with pytest.warns(PluginWarning, match="odd-hook.*fastmask_backends"):
            names = list(fm.plugins.backends())
        assert {"numpy", "numba", "cython"} <= set(names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            fm.plugins.mask_strategies()
            fm.plugins.list_plugins()
        y = fm.masked_softmax(X)  # routing is not taken down
        np.testing.assert_allclose(y, fm.masked_softmax(X, backend="numpy"), rtol=1e-6)
    finally:
        fm.plugins.unregister(plugin)


@pytest.mark.parametrize("verdict", ["ok", None, 3.0, fm.Verdict(True, "", float("nan"))])
def test_check_returning_something_else_than_a_verdict_warns_and_is_passed_over(toy, verdict):
    backend = toy(cost=1e-9)
    backend.check = lambda request: verdict
    with pytest.warns(PluginWarning, match="toy.*check\\(\\) returned"):
        exp = fm.explain(X)
    assert exp.chosen != "toy"
    with pytest.warns(PluginWarning):  # each routing decision says it again
        y = fm.masked_softmax(X)
    np.testing.assert_allclose(y, fm.masked_softmax(X, backend="numpy"), rtol=1e-6)


def test_explain_lists_every_candidate():
    exp = fm.explain(X, fm.masks.padding([3, 8]))
    names = [c.name for c in exp.candidates]
    assert {"numpy", "numba", "cython"} <= set(names)
    text = str(exp)
    assert "chosen:" in text and "numpy" in text and "padding" in text
    assert exp.chosen in names
    forced = fm.explain(X, backend="numpy")
    assert forced.chosen == "numpy" and forced.forced


def test_explain_validates_like_the_call():
    with pytest.raises(TypeError, match="masks.keep"):
        fm.explain(X, np.ones(8, np.float32))


def test_threads_setting():
    old = fm.threads.num_threads_setting()
    try:
        fm.set_num_threads(1)
        assert fm.get_num_threads() == 1
        fm.masked_softmax(X)
        with pytest.raises(ValueError):
            fm.set_num_threads(0)
        with pytest.raises(TypeError):
            fm.set_num_threads(1.5)
        fm.set_num_threads(np.int64(2))
        assert fm.get_num_threads() == 2
        many = fm.threads.available_cpus() + 1
        with pytest.warns(RuntimeWarning, match=f"set_num_threads\\({many}\\) on .* CPU"):
            fm.set_num_threads(many)
        assert fm.get_num_threads() == many  # kept: oversubscribing may be meant
    finally:
        fm.set_num_threads(old)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "2.5"])
def test_thread_count_variable_that_is_not_a_count_warns(monkeypatch, value):
    monkeypatch.setenv("FASTMASK_NUM_THREADS", value)
    with pytest.warns(RuntimeWarning, match=f"FASTMASK_NUM_THREADS='{value}' is not a thread"):
        assert fm.threads.env_threads("FASTMASK_NUM_THREADS") is None
    monkeypatch.setenv("FASTMASK_NUM_THREADS", "")
    assert fm.threads.env_threads("FASTMASK_NUM_THREADS") is None  # empty: unset, quietly


def test_thread_count_from_environment():
    code = "import fastmask as fm; print(fm.get_num_threads())"
    env = {**os.environ, "FASTMASK_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "3", out.stderr


def test_thread_count_follows_the_environment_in_a_ray_process(monkeypatch):
    # Ray sets OMP_NUM_THREADS per task in long-lived workers; fastmask reads it per
    # call where ray is imported (tests/test_ray.py checks it on a real Ray instance)
    old = fm.threads.num_threads_setting()
    try:
        fm.set_num_threads(None)
        monkeypatch.delenv("FASTMASK_NUM_THREADS", raising=False)
        monkeypatch.setitem(sys.modules, "ray", sys.modules.get("ray") or types.ModuleType("ray"))
        for n in (3, 1):
            monkeypatch.setenv("OMP_NUM_THREADS", str(n))
            assert fm.get_num_threads() == n
            assert fm.threads.threads_for(10**8, 10**5) == n
        assert fm.threads.threads_for(100, 10) == 1  # small calls: one thread, always
        fm.set_num_threads(2)  # an explicit setting wins
        assert fm.get_num_threads() == 2 and fm.threads.num_threads_setting() == 2
        fm.set_num_threads(None)
        assert fm.get_num_threads() == 1 and fm.threads.num_threads_setting() is None
    finally:
        fm.set_num_threads(old)


def _fake_distribution(tmp_path, name, module_source):
    """An installed-looking distribution with a ``fastmask`` entry point, on a path."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(module_source))
    dist = tmp_path / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fastmask]\n{name} = {name}\n")


def _run_with_path(tmp_path, code, **env):
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    full_env.pop("FASTMASK_LOAD_PLUGINS", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_entry_point_plugins_load_and_broken_ones_warn(tmp_path):
    _fake_distribution(tmp_path, "fm_broken_plugin", "raise ImportError('missing dependency')\n")
    _fake_distribution(
        tmp_path,
        "fm_good_plugin",
        """
        import fastmask as fm

        class Good(fm.Backend):
            name = "good"
            def check(self, request):
                return fm.Verdict(True, "", 1e-9)
            def masked_softmax(self, request):
                request.out4[...] = 0.25

        @fm.hookimpl
        def fastmask_backends():
            return [Good()]
        """,
    )
    code = """
        import warnings, numpy as np, fastmask as fm
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = fm.masked_softmax(np.zeros((1, 4), np.float32))
        print("warnings:", [str(x.message) for x in w])
        print("result:", y.tolist())
        print("backends:", list(fm.plugins.backends()))
    """
    out = _run_with_path(tmp_path, code)
    assert out.returncode == 0, out.stderr
    assert "fm_broken_plugin" in out.stdout and "missing dependency" in out.stdout
    assert "result: [[0.25, 0.25, 0.25, 0.25]]" in out.stdout
    assert "'good'" in out.stdout
    # The allowlist switches outside plugins off.
    out = _run_with_path(tmp_path, code, FASTMASK_LOAD_PLUGINS="")
    assert "'good'" not in out.stdout and "fm_broken_plugin" not in out.stdout


def test_no_warnings_from_builtins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.masked_softmax(X, fm.masks.causal())
