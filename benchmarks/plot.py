"""``fastmask bench --plot``: a bar chart of one run (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Sequence


def _load_pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'fastmask[bench]' (or matplotlib)"
        ) from exc
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: Sequence, path: str, title: str = "") -> None:
    """Save one horizontal bar chart per throughput workload: time relative to one copy.

    Parameters
    ----------
    results : sequence of Result or of dicts with the same fields (the JSON's ``results``)
        What ``run_suite`` returned.
    path : str
        Where to write the PNG.
    title : str
        The figure's title (name the machine).
    """
    plt = _load_pyplot()
    rows = [r if isinstance(r, dict) else vars(r) for r in results]
    workloads = [
        w
        for w in dict.fromkeys(r["workload"] for r in rows)
        if any(r["workload"] == w and r["impl"].startswith("copy") and r["seconds"] for r in rows)
    ]
    if not workloads:
        raise SystemExit("--plot: no workload with a copy yardstick was run")
    per = max(sum(1 for r in rows if r["workload"] == w and r["seconds"]) for w in workloads)
    ncols = 1 if len(workloads) <= 2 else 2
    nrows = -(-len(workloads) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(7.5 * ncols, nrows * (0.28 * per + 1.1) + 0.5), squeeze=False
    )
    for ax in axes.flat[len(workloads) :]:
        ax.set_visible(False)
    for ax, w in zip(axes.flat, workloads, strict=False):
        timed = [r for r in rows if r["workload"] == w and r["seconds"]]
        copy = next(r["seconds"] for r in timed if r["impl"].startswith("copy"))
        names = [r["impl"] for r in timed]
        ratios = [r["seconds"] / copy for r in timed]
        colors = [
            "#1f77b4" if n.startswith("fastmask") else "#7f7f7f" if n.startswith("copy")
            else "#ff7f0e"
            for n in names
        ]  # fmt: skip
        ax.barh(range(len(names)), ratios, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        for i, (ratio, r) in enumerate(zip(ratios, timed, strict=True)):
            ms = r["seconds"] * 1e3
            label = f" {ms:.3g} ms" if ms >= 0.1 else f" {ms * 1e3:.3g} us"
            ax.text(ratio, i, label, va="center", fontsize=7)
        ax.set_title(f"{w}: time / one np.copyto of the input (lower is better)", fontsize=9)
        ax.margins(x=0.25)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
