"""MkDocs hook: draw the documentation's figures from fastmask itself before each build."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def on_pre_build(config, **kwargs) -> None:
    sys.path.insert(0, str(HERE))
    try:
        import figures

        figures.main(HERE / "images")
    finally:
        sys.path.remove(str(HERE))
