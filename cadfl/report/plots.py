"""Plots of run logs: accuracy against rounds and against bytes communicated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(lines: Sequence[dict], path: Path, title: str = "") -> None:
    """Three panels: global accuracy and context accuracy vs round, accuracy vs cumulative MB.

    The bytes panel uses global accuracy where an algorithm has it, else context accuracy;
    algorithms that communicate nothing (local, central) are left out of it.
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for algo in dict.fromkeys(m["algorithm"] for m in lines):
        ms = [m for m in lines if m["algorithm"] == algo]
        for ax, key in zip(axes[:2], ("global_acc", "context_acc"), strict=True):
            pts = [(m["round"], m[key]) for m in ms if m[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=algo, marker="." if len(pts) < 40 else None)
        key = "global_acc" if any(m["global_acc"] is not None for m in ms) else "context_acc"
        mb, pts = 0.0, []
        for m in ms:
            mb += (m["bytes_down"] + m["bytes_up"]) / 1e6
            if m[key] is not None:
                pts.append((mb, m[key]))
        if pts and mb > 0:
            axes[2].plot(*zip(*pts, strict=True), label=algo)
    labels = [("global accuracy (full test set)", "round"),
              ("context accuracy (own classes, all devices)", "round"),
              ("accuracy vs communication", "cumulative MB per device (down + up)")]
    for ax, (t, xl) in zip(axes, labels, strict=True):
        ax.set_title(t)
        ax.set_xlabel(xl)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str],
                 best: Sequence[int], path: Path, title: str = "") -> None:
    """A score grid as a heat map: one row per algorithm, one column per grid point, every
    cell annotated, each row's best cell framed."""
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(columns), 0.9 + 0.45 * len(rows)))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if v < (im.norm.vmin + im.norm.vmax) / 2 else "black")
        ax.add_patch(plt.Rectangle((best[i] - 0.42, i - 0.38), 0.84, 0.76, fill=False,
                                   lw=2.5, color="red"))
    fig.colorbar(im, ax=ax, label="validation score")
    if title:
        ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
