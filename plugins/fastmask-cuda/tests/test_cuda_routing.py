"""Routing: device arrays go to ``cuda`` and stay there; host arrays only when forced."""

from __future__ import annotations

import numpy as np
import pytest

import fastmask as fm
import fastmask_cuda.plugin
from fastmask import router
from fastmask_cuda import kernels, memory

from cuda_helpers import PLUGIN_ROOT, SIMULATED, check, dev, host, logits, run_python


def test_device_arrays_route_to_cuda_and_stay_on_the_device(cuda_plugin, rng):
    x = logits(rng, (2, 3, 8))
    d = dev(x)
    e = fm.explain(d, fm.masks.causal())
    assert e.chosen == "cuda" and not e.forced
    why = {c.name: c.reason for c in e.candidates}
    assert why["numpy"] == "does not implement masked_softmax_device"
    assert "on device" in str(e)
    y = fm.masked_softmax(d, fm.masks.causal())
    assert hasattr(y, "__cuda_array_interface__") and not isinstance(y, np.ndarray)
    if not SIMULATED:
        from numba import cuda

        assert cuda.is_cuda_array(y) and type(y).__name__ == "DeviceNDArray"
    check(host(y), x, fm.masks.causal().to_dense(x.shape))


def test_host_arrays_do_not_route_to_cuda_unless_forced(cuda_plugin, rng):
    x = logits(rng, (2, 3, 8))
    e = fm.explain(x)
    assert e.chosen != "cuda"
    cuda_c = next(c for c in e.candidates if c.name == "cuda")
    assert cuda_c.ok and "never chosen automatically" in cuda_c.reason
    assert cuda_c.cost >= cuda_plugin.HOST_PENALTY_US
    assert fm.explain(x, backend="cuda").chosen == "cuda"
    y = fm.masked_softmax(x, backend="cuda")
    assert isinstance(y, np.ndarray)
    check(y, x)


def test_cpu_backend_cannot_be_forced_on_device_arrays(cuda_plugin, rng):
    with pytest.raises(ValueError, match="does not implement masked_softmax_device"):
        fm.masked_softmax(dev(logits(rng, (2, 8))), backend="numpy")


def test_unavailable_gpu_is_explained_and_never_chosen(cuda_plugin, monkeypatch, rng):
    note = "no CUDA driver (libcuda) on this machine, so no GPU"
    monkeypatch.setattr(cuda_plugin, "status", lambda: (False, note))
    router.invalidate()
    try:
        x = logits(rng, (2, 8))
        e = fm.explain(x)
        cuda_c = next(c for c in e.candidates if c.name == "cuda")
        assert not cuda_c.ok and cuda_c.reason == note
        assert note in str(e)
        with pytest.raises(ValueError, match="no CUDA driver"):
            fm.masked_softmax(x, backend="cuda")
        d = dev(x)
        assert fm.explain(d).chosen is None
        with pytest.raises(ValueError, match="no backend can serve"):
            fm.masked_softmax(d)
    finally:
        monkeypatch.undo()
        router.invalidate()


@pytest.mark.skipif(not SIMULATED, reason="this machine has a GPU")
def test_status_without_gpu_or_simulator():
    out = run_python(
        """
        import numpy as np, fastmask as fm, fastmask_cuda.plugin as p
        fm.plugins.register(p)
        ok, note = p.BACKEND.status()
        print(ok, note)
        print(fm.explain(np.zeros((2, 3), np.float32)))
        """,
        FASTMASK_LOAD_PLUGINS="",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False ")
    assert "NUMBA_ENABLE_CUDASIM" in out.stdout
    assert "cuda    cannot" in out.stdout


def test_missing_plugin_is_a_type_error_naming_it():
    out = run_python(
        """
        import fastmask as fm

        class OnGpu:
            __cuda_array_interface__ = {
                "shape": (2, 3), "typestr": "<f4", "data": (0, False), "version": 3,
            }

        for call, args in ((fm.masked_softmax, 1), (fm.explain, 1), (fm.attention, 3),
                           (fm.explain_attention, 3)):
            try:
                call(*[OnGpu()] * args)
            except TypeError as exc:
                print("TypeError:", exc)
        """,
        FASTMASK_LOAD_PLUGINS="",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4
    assert all("fastmask-cuda" in ln for ln in lines)
    assert all("TypeError: x is a GPU device array" in ln for ln in lines[:2])
    assert all("TypeError: q is a GPU device array" in ln for ln in lines[2:])


def test_importing_the_plugin_imports_no_numba_cuda():
    out = run_python(
        """
        import sys
        import fastmask_cuda.plugin
        print(any(m == "numba.cuda" or m.startswith("numba.cuda.") for m in sys.modules))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((PLUGIN_ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "fastmask-cuda"
    assert project["entry-points"]["fastmask"] == {"cuda": "fastmask_cuda.plugin"}
    deps = " ".join(project["dependencies"])
    assert "fastmask" in deps and "numba-cuda" in deps


def test_launch_configuration():
    small = kernels.launch_config(4096, 128, 132)
    assert small.kernel == "warp" and small.threads == 256 and small.rows_per_block == 8
    few = kernels.launch_config(40, 128, 132)
    assert few.kernel == "warp" and few.threads == 32 and few.blocks == 40
    long = kernels.launch_config(64, 8192, 132)
    assert long.kernel == "block" and long.threads == 1024 and long.blocks == 64
    mid = kernels.launch_config(64, 2048, 132)
    assert mid.kernel == "block" and mid.threads == 256
    huge = kernels.launch_config(10**7, 64, 132)
    assert huge.blocks == 132 * (2048 // 256) * kernels.WAVES  # grid-stride beyond that
    assert kernels.launch_config(4096, 128, 132) is small  # cached per shape


def test_kernels_compile_once_per_variant_not_per_shape(cuda_plugin, rng):
    for shape in [(3, 8), (2, 2, 5), (1, 1, 2, 6)]:
        fm.masked_softmax(dev(logits(rng, shape, np.float64)), dev(np.ones(shape, bool)))
    info = kernels.kernels.cache_info()
    assert ("d", True, None) in kernels.compiled_variants()
    fm.masked_softmax(dev(logits(rng, (4, 7), np.float64)), dev(np.ones((4, 7), bool)))
    assert kernels.kernels.cache_info().misses == info.misses


def test_memory_helpers_round_trip(rng):
    x = logits(rng, (3, 4), np.float16)
    d = memory.to_device(x)
    assert tuple(d.__cuda_array_interface__["shape"]) == (3, 4)
    np.testing.assert_array_equal(memory.to_host(d), x)
    assert memory.probe()[0]


def test_plugin_registers_one_cuda_backend(cuda_plugin):
    backends = fm.plugins.backends()
    assert backends["cuda"] is fastmask_cuda.plugin.BACKEND
    assert backends["cuda"].device == "cuda"
