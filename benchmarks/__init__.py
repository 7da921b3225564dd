"""fastmask's benchmark suite (installed as ``fastmask.bench``; run it with ``fastmask bench``).

Every workload is timed for each fastmask backend and, in the same run, for the
yardsticks: one ``np.copyto`` of the input (the memory-bandwidth floor), the
NumPy reference, and the peers that are installed (PyTorch, ONNX Runtime).
Results are ratios measured side by side; wall-clock times on shared machines
are noisy, so the suite reports medians over repeats after warm-up.
"""

from .runner import run_cli, run_suite
from .workloads import WORKLOADS

__all__ = ["WORKLOADS", "run_cli", "run_suite"]
