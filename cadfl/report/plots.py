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
