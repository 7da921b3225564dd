"""A newcomer's trap: Python run inside the source checkout after ``pip install .``.

The checkout's ``fastmask`` (no compiled extension) then shadows the installed one.
fastmask says so loudly, with the fix, and ``fastmask bench`` starts its child
processes so that they import what the parent imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastmask as fm

ROOT = Path(fm.__file__).resolve().parent.parent


def _checkout_copy(tmp_path: Path) -> Path:
    """The source tree as a fresh clone has it: no compiled extension."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("needs fastmask's source tree")
    shutil.copytree(ROOT / "fastmask", tmp_path / "fastmask",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))  # fmt: skip
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    return tmp_path


def test_python_in_the_checkout_warns_and_explain_says_why(tmp_path):
    checkout = _checkout_copy(tmp_path)
    site = str(Path(np.__file__).resolve().parent.parent)  # NumPy, not fastmask's finder
    code = (
        "import numpy as np, fastmask as fm\n"
        "print('FILE', fm.__file__)\n"
        "print(fm.explain(np.zeros((2, 8))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=checkout, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=site), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"FILE {checkout / 'fastmask'}" in out.stdout
    assert "RuntimeWarning: fastmask is imported from its source checkout" in out.stderr
    assert "pip install -e ." in out.stderr
    assert "source checkout" in out.stdout  # explain's reason for the cython backend
    assert "reinstall with a C compiler" not in out.stdout


def test_a_built_checkout_or_an_installed_copy_gives_no_such_message():
    from fastmask.backends._checkout import source_checkout_message

    ok, _ = fm.plugins.backends()["cython"].status()
    if not ok:
        pytest.skip("the compiled extension is not built here")
    assert source_checkout_message() is None


def test_bench_children_import_what_the_parent_imported(tmp_path):
    try:
        from fastmask.bench.isolation import python_child
    except ImportError:
        from benchmarks.isolation import python_child
    checkout = _checkout_copy(tmp_path)  # a fastmask in the child's current directory
    argv, env = python_child("import fastmask; print(fastmask.__file__)")
    out = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == Path(fm.__file__).resolve()
