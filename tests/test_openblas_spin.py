"""NumPy's OpenBLAS workers get a short spin when fastmask loads (fastmask.openblas_spin).

Each check runs in a fresh process: the setting is made once, when the compiled kernels
load. The spin is observed, not timed: the CPU time the process's other threads burn
while the main thread sleeps right after a threaded matmul.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from fastmask import openblas_spin

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/maps and schedstat"
)

_PROBE = r"""
import json, os, time
import numpy as np
import fastmask
from fastmask import openblas_spin

def others_cpu_seconds():
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9

a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
ref = a.astype(np.float64) @ a.astype(np.float64)
busy = []
for _ in range(3):
    c = a @ a  # threaded: OPENBLAS_NUM_THREADS=2
    time.sleep(0.005)
    before = others_cpu_seconds()
    time.sleep(0.15)
    busy.append(others_cpu_seconds() - before)
servers = [openblas_spin._thread_server(p) for p in openblas_spin._loaded_openblas()]
print(json.dumps({"setting": list(openblas_spin.setting().values()), "busy": min(busy),
                  "pthreads": any(not isinstance(s, str) for s in servers),
                  "right": bool(np.allclose(c, ref, rtol=1e-4, atol=1e-2))}))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if "OPENBLAS" not in k}
    full.update(OPENBLAS_NUM_THREADS="2", **env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"stderr": out.stderr}


def test_numpy_openblas_workers_sleep_right_after_a_call():
    got = _probe()
    if not got["pthreads"]:
        pytest.skip(f"NumPy's BLAS is not OpenBLAS's pthreads server: {got['setting']}")
    assert got["setting"] == [f"workers spin 2**{openblas_spin.TIMEOUT_EXPONENT} cycles "
                              "(FASTMASK_OPENBLAS_TIMEOUT)"]  # fmt: skip
    assert got["right"]  # the restarted pool computes
    assert got["busy"] < 0.02, got  # OpenBLAS's default spins ~0.1 s of these 0.15 s


def test_off_leaves_openblas_spinning_as_it_was():
    got = _probe(FASTMASK_OPENBLAS_TIMEOUT="off")
    assert got["setting"] and all(s.startswith("left alone") for s in got["setting"])
    if not got["pthreads"]:
        pytest.skip("NumPy's BLAS is not OpenBLAS's pthreads server")
    assert got["right"] and got["busy"] > 0.03, got  # the control: the probe sees a spin


def test_the_users_own_timeout_is_kept():
    got = _probe(OPENBLAS_THREAD_TIMEOUT="10")
    assert got["setting"] and all("OPENBLAS_THREAD_TIMEOUT" in s for s in got["setting"])


def test_a_bad_value_warns_and_takes_the_default():
    got = _probe(FASTMASK_OPENBLAS_TIMEOUT="abc")
    assert "FASTMASK_OPENBLAS_TIMEOUT='abc' is ignored" in got["stderr"]
    assert "RuntimeWarning" in got["stderr"]
    if got["pthreads"]:
        assert got["setting"][0].startswith(f"workers spin 2**{openblas_spin.TIMEOUT_EXPONENT}")


def test_no_restart_while_other_threads_run():
    paths = openblas_spin._loaded_openblas()
    if not paths:
        pytest.skip("no OpenBLAS loaded")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        done = [openblas_spin._shorten_one(p, openblas_spin.TIMEOUT_EXPONENT) for p in paths]
    finally:
        stop.set()
        other.join()
    assert all(d.startswith("left alone") or "pool's next start" in d for d in done), done
