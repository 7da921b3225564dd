"""The benchmark suite and ``fastmask bench``: it runs, reports, and checks its targets.

Times are never asserted (shared, noisy machines); only that every number is
measured, reported and compared the way the docs say.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

try:  # installed: the suite ships as fastmask.bench
    import fastmask.bench as bench
    from fastmask.bench import isolation, plot, runner, targets
except ImportError:  # a source checkout on sys.path without an install
    import benchmarks as bench
    from benchmarks import isolation, plot, runner, targets


def test_every_workload_of_the_issue_is_in_the_suite():
    for name in ("W1", "W1-dense", "W2", "W3", "W4", "W5-f16", "W5-f64", "W6", "A1", "A2",
                 "tiny", "scaling", "startup", "memory"):  # fmt: skip
        assert name in bench.WORKLOADS


def test_a_quick_run_times_the_yardsticks_and_fastmask_and_reports_targets():
    results = bench.run_suite(["tiny", "W4"], threads=1, quick=True, isolate=False, log=None)
    by = {(r.workload, r.impl): r for r in results}
    for w in ("tiny", "W4"):
        assert by[(w, "copy (np.copyto)")].seconds > 0
        assert by[(w, "fastmask (auto)")].seconds > 0
        assert by[(w, "numpy reference")].seconds > 0
        assert by[(w, "fastmask[cython] out=")].seconds > 0
    table = runner.format_table(results)
    assert "tiny: repeat call, total" in table and "targets:" in table


def test_peers_run_in_a_separate_process():
    with isolation.PeerProcess() as child:
        results = child.time_peers("W4", 1, True)
    names = [r.impl for r in results]
    assert names and all(isolation.is_peer(n) for n in names)
    for r in results:  # timed there, or skipped with the reason
        assert r.seconds or r.note


def test_targets_are_ratios_of_the_same_run():
    R = runner.Result
    results = [
        R("W1", "copy (np.copyto)", 1.0),
        R("W1", "fastmask[cython] out=", 1.2),
        R("W1", "fastmask (auto)", 2.0),
        R("W1", "onnxruntime add+softmax", 3.0),
        R("W1", "torch masked_fill+softmax", 30.0),
        R("scaling", "fastmask (auto) speed-up", None, "", 1.5, "x"),
        R("startup", "import fastmask", None, "", 0.1, "s"),
    ]
    got = {t.name: (round(t.measured, 3), t.met) for t in targets.check(results)}
    assert got["W1: best fastmask out= / copy"] == (1.2, True)
    assert got["W1: onnxruntime / fastmask (auto)"] == (1.5, False)
    assert got["W1: torch masked_fill+softmax / fastmask (auto)"] == (15.0, True)
    assert got["scaling: W1 1 thread / N threads (auto)"] == (1.5, False)
    assert got["startup: import fastmask"] == (0.1, True)


def test_cold_start_is_measured_in_new_processes():
    results = runner._startup(1, True, lambda r: None)
    values = {r.impl: r.value for r in results}
    assert 0 < values["import fastmask"] < values["python -c 'import fastmask' (process)"]
    assert any(k.startswith("first call in a new process") for k in values)
    note = next(r.note for r in results if r.impl == "import fastmask")
    assert note == "numba not imported"  # Numba is imported lazily


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    R = runner.Result
    results = [R("W1", "copy (np.copyto)", 0.005), R("W1", "fastmask (auto)", 0.006),
               R("W1", "torch _masked_softmax", None, "torch not installed"),
               R("startup", "import fastmask", None, "", 0.1, "s")]  # fmt: skip
    path = tmp_path / "chart.png"
    plot.plot_results(results, str(path), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_writes_json_and_png(tmp_path):
    try:
        import fastmask.bench  # noqa: F401
    except ImportError:
        pytest.skip("fastmask bench needs fastmask installed (pip install -e .)")
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        [sys.executable, "-m", "fastmask", "bench", "--quick", "--workload", "tiny",
         "--threads", "1", "--json", str(tmp_path / "r.json"),
         "--plot", str(tmp_path / "r.png")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "fastmask (auto)" in out.stdout and "targets:" in out.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["threads"] == 1 and data["results"] and "targets" in data
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown workload 'W99'"):
        bench.run_suite(["W99"], isolate=False)
