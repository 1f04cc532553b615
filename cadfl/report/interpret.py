"""Figures that look inside a model: filter images, class preferences, selectivity by depth,
and CAD's critical paths."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..cad.decouple import Decoupling  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def filter_grid(images: torch.Tensor, labels: Sequence[str], path: Path, title: str) -> None:
    """A grid of images (N, C, H, W) in [0, 1], each titled with its label."""
    n = len(images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, label in zip(axes.flat, images, labels, strict=False):
        pic = img.permute(1, 2, 0).numpy()
        ax.imshow(pic[..., 0] if pic.shape[2] == 1 else pic, cmap="gray",
                  interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def preference_heatmap(means: torch.Tensor, class_names: Sequence[str], layer: str,
                       path: Path) -> None:
    """Per-class mean activation (K, F) of a layer's filters, each filter scaled to its maximum,
    filters sorted by preferred class: a diagonal staircase means class-specific filters."""
    scaled = means / means.max(0).values.clamp_min(1e-12)
    pref = means.argmax(0)
    # By preferred class, then the most selective first (lowest mean over all classes).
    order = torch.argsort(pref * 2 + scaled.mean(0), stable=True)
    fig, ax = plt.subplots(figsize=(min(16, 3 + means.shape[1] / 16),
                                    0.35 * len(class_names) + 1.4))
    im = ax.imshow(scaled[:, order].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel(f"{means.shape[1]} filters, sorted by preferred class")
    ax.set_title(f"{layer}: mean activation per class (each filter scaled to its maximum)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    _save(fig, path)


def selectivity_plot(selectivity: dict[str, float], path: Path, threshold: float,
                     suggested_depth: int) -> None:
    """Class selectivity of each layer against depth, the threshold, and where decoupling
    would start (the CAD paper's "filter functionality divergence")."""
    names = list(selectivity)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 3.6))
    ax.plot(range(len(names)), [selectivity[n] for n in names], marker="o")
    ax.axhline(threshold, color="gray", linestyle="--", label=f"threshold {threshold}")
    convs = [n for n in names if n.startswith("conv")]
    if suggested_depth:
        start = names.index(convs[-suggested_depth])
        ax.axvspan(start - 0.5, len(names) - 0.5, color="tab:orange", alpha=0.15,
                   label=f"decoupled (depth {suggested_depth})")
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_ylabel("selectivity (0 generic .. 1 one class)")
    ax.set_ylim(0, 1)
    ax.set_title("class selectivity of filters by depth")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, path)


def critical_paths(dec: Decoupling, class_names: Sequence[str], highlight: int,
                   path: Path) -> None:
    """Which filters of each decoupled layer belong to which class; the path of class
    `highlight` from the trunk to its logit is drawn on top."""
    layers = [n for n in dec.spec.names[dec.first:] if dec.spec.layer(n).weighted]
    k = dec.num_classes
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(9, 0.9 * len(layers) + 1.8))
    centres = []
    for row, name in enumerate(layers):
        width = dec.spec.layer(name).out_ch
        g = width // k
        y = len(layers) - row
        for c in range(k):
            ax.barh(y, g / width, left=c * g / width, height=0.5, color=cmap(c % cmap.N),
                    alpha=1.0 if c == highlight else 0.35, edgecolor="white", linewidth=0.5)
        centres.append(((highlight + 0.5) * g / width, y))
        ax.text(-0.01, y, f"{name} ({g}/class)", ha="right", va="center", fontsize=9)
    ax.barh(len(layers) + 1, 1, height=0.5, color="lightgray")
    ax.text(-0.01, len(layers) + 1, "shared trunk", ha="right", va="center", fontsize=9)
    xs, ys = zip(*[(0.5, len(layers) + 1), *centres], strict=True)
    ax.plot(xs, ys, color="black", marker="o", linewidth=2)
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([(c + 0.5) / k for c in range(k)], class_names, rotation=45, fontsize=8)
    ax.set_title(f"class paths of the decoupled layers; path of '{class_names[highlight]}' "
                 "from trunk to logit")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    _save(fig, path)
