"""The ``fastmask`` command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastmask", *args], capture_output=True, text=True, timeout=300
    )


def test_info_lists_backends_threads_and_plugins():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for word in ("fastmask", "threads:", "numpy", "numba", "cython", "plugins:"):
        assert word in out.stdout


def test_demo_shows_masks_routing_and_the_minus_1e9_contrast():
    out = run("demo")
    assert out.returncode == 0, out.stderr
    assert "padding" in out.stdout and "causal" in out.stdout
    assert "routed to:" in out.stdout
    assert "nan" in out.stdout and "0.167" in out.stdout  # TF's NaN and uniform rows
    assert out.stderr == ""


def test_version_and_usage():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("fastmask ")
    assert run().returncode != 0


def test_a_closed_pipe_is_not_an_error():
    # `true` exits without reading: every write of the command meets a closed pipe.
    out = subprocess.run(
        f"{sys.executable} -m fastmask info | true", shell=True, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr
