"""Detect the newcomer's trap: Python started inside fastmask's source checkout.

After ``pip install .``, running Python from the checkout's root imports the source
tree (the current directory comes first on ``sys.path``), which has no compiled
extension: every call would silently run the NumPy reference, ~100x slower. NumPy and
scikit-learn refuse or warn in the same situation; fastmask warns, once, with the fix.
"""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path


@functools.cache
def source_checkout_message() -> str | None:
    """What to tell a user whose ``fastmask`` is a source checkout without its compiled
    extension (None when it is not one)."""
    package = Path(__file__).resolve().parent.parent
    root = package.parent
    if not ((root / "setup.py").is_file() and (package / "_kernels.pyx").is_file()):
        return None
    if any(package.glob("_kernels*.so")) or any(package.glob("_kernels*.pyd")):
        return None  # built in place (pip install -e .): nothing to say
    installed = ""
    try:
        other = Path(str(metadata.distribution("fastmask").locate_file("fastmask"))).resolve()
    except (metadata.PackageNotFoundError, OSError, TypeError):
        other = None
    if other is not None and other != package and (other / "__init__.py").is_file():
        installed = f" (the installed copy at {other} is hidden by it)"
    return (
        f"fastmask is imported from its source checkout {package}{installed}, which has no "
        "compiled extension: every call would run the NumPy reference, ~100x slower. Run "
        "Python from another folder to use the installed fastmask, or build the checkout "
        "in place: pip install -e . (or python setup.py build_ext --inplace)"
    )
