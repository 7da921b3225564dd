"""Plugin tests: the plugin module is registered per test and unregistered after."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The suite must not pick up whatever plugins happen to be installed.
os.environ.setdefault("FASTMASK_LOAD_PLUGINS", "")

#: The plugin's source folder: importable without installing the package.
PLUGIN_ROOT = Path(__file__).resolve().parents[1]
if str(PLUGIN_ROOT) not in sys.path:
    sys.path.insert(0, str(PLUGIN_ROOT))

import pytest  # noqa: E402

import fastmask as fm  # noqa: E402
import fastmask_masks_extra.plugin  # noqa: E402


@pytest.fixture
def extra():
    """``fastmask.masks`` with this plugin registered (unregistered afterwards)."""
    name = fm.plugins.register(fastmask_masks_extra.plugin, name="masks-extra-tests")
    try:
        yield fm.masks
    finally:
        fm.plugins.unregister(name=name)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(2024)
