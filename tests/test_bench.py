"""The benchmark suite and ``fastmask bench``: it runs, reports, and checks its targets.

Times are never asserted (shared, noisy machines); only that every number is
measured, reported and compared the way the docs say.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import pytest

import fastmask as fm

try:  # installed: the suite ships as fastmask.bench
    import fastmask.bench as bench
    from fastmask.bench import isolation, peers, pipeline, plot, reports, runner, targets
except ImportError:  # a source checkout on sys.path without an install
    import benchmarks as bench
    from benchmarks import isolation, peers, pipeline, plot, reports, runner, targets


def test_every_workload_of_the_issue_is_in_the_suite():
    for name in ("W1", "W1-dense", "W2", "W3", "W4", "W5-f16", "W5-f64", "W6", "A1", "A2",
                 "A3", "A4", "tiny", "scaling", "startup", "memory", "pipeline"):  # fmt: skip
        assert name in bench.WORKLOADS


#: The attention workloads' own builders at small shapes (same masks, GQA, padding sides).
SMALL_ATTENTION = {
    "A1": {"b": 2, "h": 3, "length": 40, "d": 16, "shortest": 8},
    "A2": {"h": 2, "length": 64, "d": 16},
    "A3": {"b": 3, "hq": 8, "hk": 2, "length": 64, "d": 16},
    "A4": {"h": 2, "length": 96, "d": 16, "window": 16},
}

#: Every attention peer, and the package it needs (None: NumPy only).
ATTENTION_PEERS = {
    "torch sdpa": "torch",
    "torch flex_attention": "torch",
    "onnxruntime attention": "onnxruntime",
    "onnxruntime contrib MHA/GQA": "onnxruntime",
    "openvino sdpa": "openvino",
    "tf tutorial (compat.tf)": None,
    "tf tutorial (numpy)": None,
}


def _small(name):
    return bench.WORKLOADS[name].make(np.random.default_rng(1), **SMALL_ATTENTION[name])


def test_every_attention_peer_is_checked():
    names = {n for n, _ in runner._attention_impls(None, 1) if runner.is_peer(n)}
    assert names == set(ATTENTION_PEERS)
    assert {n for n, w in bench.WORKLOADS.items() if w.op == "attention"} == set(SMALL_ATTENTION)


@pytest.mark.parametrize("name", SMALL_ATTENTION)
def test_the_peers_mask_is_fastmasks_mask_and_its_flops_count_kept_pairs(name):
    inp = _small(name)
    dense = inp.kwargs["mask"].to_dense(inp.scores_shape())
    np.testing.assert_array_equal(np.broadcast_to(inp.keep, dense.shape), dense)
    d, dv = inp.q.shape[-1], inp.v.shape[-1]
    assert inp.attention_flops() == 2 * (d + dv) * np.count_nonzero(dense)


@pytest.mark.parametrize("peer", ATTENTION_PEERS)
@pytest.mark.parametrize("name", SMALL_ATTENTION)
def test_attention_peers_compute_fastmasks_attention(name, peer):
    if ATTENTION_PEERS[peer]:
        pytest.importorskip(ATTENTION_PEERS[peer])
    inp = _small(name)
    fn, note = dict(runner._attention_impls(inp, 1))[peer]()
    assert fn is not None, note  # every peer serves every attention workload
    got = peers.output(fn, fn())
    # fastmask's NumPy reference: the peers are checked, not fastmask's kernels.
    want = fm.attention(inp.q, inp.k, inp.v, **inp.kwargs, backend="numpy")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_attention_tables_show_gflops_and_the_gemm_peak():
    R = runner.Result
    results = [
        R(runner.GEMM, "GEMM peak", None, "float32 (2048x2048) @ (2048x2048)", 123.45, "GFLOP/s"),
        R("A1", "copy (np.copyto q,k,v)", 0.001),
        R("A1", "fastmask (auto)", 0.002, flops=4e8),
        R("A1", "torch sdpa", 0.004, "torch SDPA", flops=4e8),
        R("A1", "openvino sdpa", None, "openvino not installed"),
    ]
    lines = runner.format_table(results).splitlines()
    assert lines[0] == "GEMM peak: 123.5 GFLOP/s   (float32 (2048x2048) @ (2048x2048))"
    row = {line.split("  ")[1]: line.split() for line in lines if line.startswith("  ")}
    assert row["implementation"][-1] == "GFLOP/s"
    assert row["fastmask (auto)"][-1] == "200.0"
    assert row["torch sdpa"][-3:] == ["2.0x", "faster", "100.0"]
    assert row["copy (np.copyto q,k,v)"][-1] == "1.00"  # no rate for the copy
    softmax = runner.format_table([R("W4", "copy (np.copyto)", 0.001)])
    assert "GFLOP/s" not in softmax


def test_gemm_peak_is_measured():
    gflops, note = reports.gemm_peak(1, n=256, repeats=2)
    assert gflops > 0 and "256x256" in note


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


def test_pipeline_alternates_without_pauses_and_times_both_directions():
    trace = []
    f, nb = (lambda: trace.append("f")), (lambda: trace.append("n"))
    t = pipeline.interplay(f, nb, samples=pipeline.ROUNDS, settle=0.0)
    assert set(t) == {"f", "n", "f after n", "n after f", "f after n idle", "n after f idle"}
    assert all(s >= 0 for s in t.values())
    # each round: f alone (an untimed start, one timed), n alone, then n f alternating,
    # then n f alternating with the pools idle in between (untimed, not traced)
    assert "".join(trace) == "ffnnnfnfnfnf" * pipeline.ROUNDS


def test_pipeline_rows_cover_every_case_neighbour_and_direction():
    torch = pytest.importorskip("torch")
    before = fm.get_num_threads(), torch.get_num_threads()
    rows = list(pipeline.measure(1, 3, small=True, settle=0.0))
    assert (fm.get_num_threads(), torch.get_num_threads()) == before  # restored
    cases = [n for n, _ in pipeline.fastmask_cases(small=True)]
    neighbours = [n for n, _ in pipeline.neighbour_cases(torch, small=True)]
    assert len(cases) == 6 and len(neighbours) == 4
    pairs = {r.impl: r for r in rows if r.note in ("ok", pipeline.MISSED)}
    controls = {r.impl: r for r in rows if r.note == pipeline.CONTROL}
    for c in cases:
        for n in neighbours:
            for timed, other in ((c, n), (n, c)):
                r = pairs.pop(f"{timed} after {other}")
                assert r.seconds > 0 and r.value > 0 and r.unit == "x"
                assert (r.note == "ok") == (r.value <= pipeline.TARGET)
                ctl = controls.pop(f"{timed} after {other}, pools idle")
                assert ctl.seconds > 0 and ctl.value > 0 and ctl.unit == "x"
    assert not pairs and not controls
    layer = {r.impl: r for r in rows if r.impl.startswith("encoder layer")}
    ratio = layer["encoder layer: NumPy + fm.attention / torch"].value
    numpy_s = layer["encoder layer: NumPy + fm.attention"].seconds
    assert ratio == pytest.approx(numpy_s / layer["encoder layer: torch matmuls + sdpa"].seconds)
    raw, pools = pipeline.check(rows)
    assert raw.measured == max(r.value for r in rows if r.note in ("ok", pipeline.MISSED))
    idle = {r.impl.removesuffix(", pools idle"): r.value
            for r in rows if r.note == pipeline.CONTROL}  # fmt: skip
    shares = [r.value / idle[r.impl] for r in rows if r.note in ("ok", pipeline.MISSED)]
    assert pools.measured == pytest.approx(max(shares))
    table = runner.format_table(rows)
    assert "right after" in table and "pipeline: worst of 48" in table
    assert "thread pools' part" in table and "pools idle" not in table  # shown as columns


def test_pipeline_encoder_layers_compute_the_same():
    torch = pytest.importorskip("torch")
    numpy_layer, torch_layer, _ = pipeline.encoder_calls(torch, small=True)
    np.testing.assert_allclose(numpy_layer(), torch_layer().numpy(), rtol=1e-4, atol=1e-4)


def test_pipeline_report_runs_in_a_fresh_process():
    assert runner._REPORTS[bench.WORKLOADS["pipeline"].op] is pipeline.report
    seen = []
    results = pipeline.report(1, True, seen.append, small=True)
    assert results == seen and results[-1].impl.startswith("encoder layer")
    assert all(r.workload == "pipeline" for r in results)


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown workload 'W99'"):
        bench.run_suite(["W99"], isolate=False)


def test_outputs_that_cannot_be_written_are_refused_before_the_run(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    args = argparse.Namespace(json=str(missing / "r.json"), plot=str(missing / "r.png"),
                              threads=0, workload=["tiny"], quick=True, no_progress=True,
                              check=False)  # fmt: skip
    started = time.perf_counter()
    assert runner.run_cli(args) == 2
    assert time.perf_counter() - started < 5  # nothing was run first
    err = capsys.readouterr().err
    assert "--json" in err and "--plot" in err and "does not exist" in err
    assert "--threads must be >= 1" in err
    assert not missing.exists()


def test_check_exits_1_on_a_missed_target(monkeypatch, capsys):
    missed = [targets.Target("a made-up target", 0.5, ">= 1x", False)]
    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: [])
    monkeypatch.setattr(runner, "format_table", lambda results: "")
    monkeypatch.setattr(runner, "check_targets", lambda results: missed)
    args = argparse.Namespace(json=None, plot=None, threads=1, workload=["tiny"], quick=True,
                              no_progress=True, check=True)  # fmt: skip
    assert runner.run_cli(args) == 1
    assert "1 target(s) MISSED" in capsys.readouterr().err
    monkeypatch.setattr(runner, "check_targets", lambda results: [])
    assert runner.run_cli(args) == 0
    args.check = False
    monkeypatch.setattr(runner, "check_targets", lambda results: missed)
    assert runner.run_cli(args) == 0  # without --check: a report, not a verdict


def test_peer_ratios_below_one_read_as_slower():
    assert runner._relative(3.14) == "3.1x faster"
    assert runner._relative(0.2) == "5.0x slower"
