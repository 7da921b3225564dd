"""Peers timed in a separate process, so that neither library's thread pool slows the other.

OpenMP runtimes keep their worker threads spinning for a while after a parallel
region; two of them in one process (fastmask's and PyTorch's or ONNX Runtime's)
steal each other's cores on a small machine and make the second one look slow.
The suite therefore times the peers in one long-lived child Python process (a
fresh interpreter, so no inherited thread pools and no re-import of the caller's
``__main__``) that rebuilds the workload's inputs from the same seed. Requests and
results travel as JSON lines over the child's stdin and stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

#: Implementation names (prefixes) that are peers rather than fastmask or a yardstick.
PEER_PREFIXES = ("torch", "onnxruntime", "openvino", "tf tutorial")
_TAG = "fastmask-bench-result: "
_READY = "fastmask-bench-ready"


def is_peer(name: str) -> bool:
    return name.startswith(PEER_PREFIXES)


def python_child(code: str) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of a child Python that imports what this process
    imported: this process's ``sys.path`` (absolute) as ``PYTHONPATH``, and not the
    current directory first, as ``python -c`` would put it: run from a source checkout,
    that would import the checkout's uncompiled ``fastmask`` instead of the installed one."""
    path = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    return [sys.executable, "-c", "import sys; del sys.path[0]\n" + code], dict(
        os.environ, PYTHONPATH=path
    )


class PeerProcess:
    """One child interpreter that times peers on request; use as a context manager.

    The child starts on the first request, and the request waits until it has
    started up: its imports must not overlap the parent's timings.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def _line(self, tag: str) -> str:
        """The child's next stdout line that starts with ``tag``, without the tag."""
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :]
        raise RuntimeError(f"the peer process died (exit code {self._proc.wait()}); see stderr")

    def time_peers(self, workload: str, threads: int, quick: bool) -> list:
        from .runner import Result

        if self._proc is None:
            argv, env = python_child(f"from {__name__} import _serve; _serve()")
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            self._line(_READY)
        assert self._proc.stdin is not None
        request = {"workload": workload, "threads": threads, "quick": quick}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return [Result(**r) for r in json.loads(self._line(_TAG))]

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _serve() -> None:
    from .runner import time_workload_peers

    print(_READY, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        results = time_workload_peers(req["workload"], req["threads"], req["quick"])
        print(_TAG + json.dumps([asdict(r) for r in results]), flush=True)
