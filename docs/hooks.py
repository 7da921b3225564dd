"""MkDocs hook: draw the documentation's figures from fastmask itself before each build."""

from __future__ import annotations

import json
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
    draw_benchmark_chart(HERE / "data" / "bench.json", HERE / "images" / "bench.png")


def draw_benchmark_chart(data: Path, png: Path) -> None:
    """The performance page's table and chart, from the saved ``fastmask bench --json`` run.

    The table is ``fastmask bench``'s own text table and the chart its ``--plot``
    drawing, both made from the JSON, so the page cannot disagree with the run.
    """
    try:
        from fastmask.bench import plot, runner
    except ImportError:  # a source checkout without an install
        sys.path.insert(0, str(HERE.parent))
        from benchmarks import plot, runner
    run = json.loads(data.read_text())
    png.parent.mkdir(exist_ok=True)
    plot.plot_results(run["results"], str(png), title=f"{run['machine']}; {run['threads']} threads")
    table = runner.format_table([runner.Result(**r) for r in run["results"]])
    md, text = data.parent / "bench-table.md", f"```text\n{table}\n```\n"
    if not md.exists() or md.read_text() != text:  # unchanged: no rebuild loop in `serve`
        md.write_text(text)
