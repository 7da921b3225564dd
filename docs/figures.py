"""Draw the documentation's pictures from fastmask itself (run by docs/hooks.py at build time).

python docs/figures.py [OUTDIR]       # default: docs/images
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import fastmask as fm
from fastmask import masks

L = 16

#: (file stem, title, strategy, (Lq, Lk)) — the gallery, in page order.
GALLERY = [
    ("padding", "padding(lengths=11)", masks.padding(11), (L, L)),
    ("padding_left", 'padding(11, side="left")', masks.padding(11, side="left"), (L, L)),
    ("causal", "causal()", masks.causal(), (L, L)),
    ("causal_offset", "causal(offset=-2)", masks.causal(-2), (L, L)),
    (
        "causal_bottom_right",
        'causal(align="bottom-right"), Lq=6 < Lk',
        masks.causal(align="bottom-right"),
        (6, L),
    ),
    ("sliding_window", "sliding_window(4)", masks.sliding_window(4), (L, L)),
    ("band", "sliding_window(3, causal=False)", masks.sliding_window(3, causal=False), (L, L)),
    ("prefix_lm", "prefix_lm(5)", masks.prefix_lm(5), (L, L)),
    (
        "segments",
        "segments(ids) & causal()",
        masks.segments(np.repeat([0, 1, 2], [6, 4, 6])) & masks.causal(),
        (L, L),
    ),
    (
        "causal_padding",
        "causal() & padding(11)",
        masks.causal() & masks.padding(11),
        (L, L),
    ),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gallery(out: Path) -> None:
    plt = _plt()
    rng = np.random.default_rng(0)
    for stem, title, strategy, (lq, lk) in GALLERY:
        x = rng.standard_normal((lq, lk)).astype(np.float32)
        keep = strategy.to_dense(x.shape)
        w = fm.masked_softmax(x, strategy)
        fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.4 * max(lq / lk, 0.45)))
        axes[0].imshow(keep, cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
        axes[0].set_title("mask (dark = keep)", fontsize=9)
        im = axes[1].imshow(w, cmap="viridis", vmin=0, interpolation="nearest")
        axes[1].set_title("weights = masked_softmax(x, mask)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("key j", fontsize=8)
            ax.set_ylabel("query i", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        fig.suptitle(title, fontsize=10, family="monospace")
        fig.tight_layout()
        fig.savefig(out / f"gallery_{stem}.png", dpi=90)
        plt.close(fig)


def minus_1e9(out: Path) -> None:
    """One ordinary row and one fully masked row, through three recipes."""
    plt = _plt()
    x = np.array([[2.0, 1.0, 0.5, 3.0], [2.0, 1.0, 0.5, 3.0]], np.float32)
    drop = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.float32)  # TF convention: 1 = masked

    def tf_style(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    with np.errstate(invalid="ignore", divide="ignore"):
        recipes = {
            "x + mask * -1e9": tf_style(x + drop * np.float32(-1e9)),
            "x + where(mask, -inf, 0)": tf_style(np.where(drop == 1, -np.inf, x)),
            "fastmask": fm.masked_softmax(x, masks.drop(drop)),
        }
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), sharey=True)
    keys = np.arange(4)
    for row, ax in enumerate(axes):
        for i, (name, w) in enumerate(recipes.items()):
            vals = np.nan_to_num(w[row], nan=-0.05)
            ax.bar(keys + (i - 1) * 0.27, vals, width=0.27, label=name)
            for k, v in zip(keys, w[row], strict=True):
                if np.isnan(v):
                    ax.text(k + (i - 1) * 0.27, 0.02, "NaN", ha="center", fontsize=7, rotation=90)
        ax.set_xticks(keys, [f"key {k}" + (" (masked)" if drop[row, k] else "") for k in keys])
        ax.tick_params(labelsize=7)
        ax.set_title(["keys 2, 3 masked", "every key masked"][row], fontsize=9)
    axes[0].set_ylabel("attention weight")
    # Below the panels, not over the bars (which reach the top of the axes).
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(labels),
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "minus_1e9.png", dpi=90)
    plt.close(fig)


def attention_tiles(out: Path) -> None:
    """The key blocks the fused attention engine computes (red) over the mask (grey),
    from its own plan (``fastmask.kernels.fused_attention.item_ranges``)."""
    from matplotlib.patches import Rectangle

    from fastmask import _kernels
    from fastmask.attention_request import build_attention_requests
    from fastmask.kernels.fused_attention import BLOCK_KEYS, item_ranges

    plt = _plt()
    n, d = 512, 8
    q = np.zeros((1, 1, n, d), np.float32)
    cases = [
        ("causal()", masks.causal()),
        ("padding(320)", masks.padding(320)),
        ("sliding_window(96)", masks.sliding_window(96)),
    ]
    fig, axes = plt.subplots(1, len(cases), figsize=(9.6, 3.5))
    for ax, (title, strategy) in zip(axes, cases, strict=True):
        request = build_attention_requests(q, q, q, strategy)[0][0]
        starts, lo, hi = item_ranges(request, _kernels)
        keep = strategy.to_dense((n, n))
        ax.imshow(keep, cmap="Greys", vmin=0, vmax=2.5, interpolation="nearest")
        computed = 0
        for i, q0 in enumerate(starts.tolist()):
            rows = min(n, q0 + (starts[1] if len(starts) > 1 else n)) - q0
            k0, k1 = int(lo[0, 0, i]), int(hi[0, 0, i])
            computed += rows * (k1 - k0)
            for b0 in range(k0, k1, BLOCK_KEYS):
                width = min(BLOCK_KEYS, k1 - b0)
                corner = (b0 - 0.5, q0 - 0.5)
                ax.add_patch(Rectangle(corner, width, rows, fill=False, edgecolor="tab:red",
                                       linewidth=0.6))  # fmt: skip
        ax.set_xlim(-8, n + 8)
        ax.set_ylim(n + 8, -8)
        ax.set_title(f"{title}: {100.0 * computed / (n * n):.0f}% computed", fontsize=9,
                     family="monospace")  # fmt: skip
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "attention_tiles.png", dpi=90)
    plt.close(fig)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gallery(out)
    minus_1e9(out)
    attention_tiles(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images")
