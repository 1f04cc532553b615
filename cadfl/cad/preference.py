"""Class preference of filters: per-class mean of each filter's post-ReLU activation.

`A_f(x)` is the spatial mean of filter f's post-ReLU feature map (for a hidden linear unit, its
post-ReLU value). Its class preference is `argmax_c mean_{x in class c} A_f(x)`. This one
implementation serves both the CAD activation assignment (devices send only the per-class
sums) and the interpretability tools.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.augment import to_float
from ..device.precision import autocast
from ..models import ModelSpec, build_loaded

Sums = dict[str, torch.Tensor]


def activation_layers(spec: ModelSpec) -> dict[str, int]:
    """Conv/linear layer (or block) name -> index of the ReLU that follows it before the next
    such layer (the logits have none; neither has a block that feeds the next block)."""
    out = {}
    for i, layer in enumerate(spec.layers):
        if not layer.weighted:
            continue
        for j in range(i + 1, len(spec.layers)):
            if spec.layers[j].behaviour.activation:
                out[spec.names[i]] = j
                break
            if spec.layers[j].weighted:
                break
    return out


def class_activation_sums(spec: ModelSpec, state: dict[str, torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor, num_classes: int, mean: tuple[float, ...],
                          std: tuple[float, ...], batch_size: int = 500,
                          precision: str = "fp32") -> tuple[Sums, torch.Tensor]:
    """Per-class sums (K, F) of every filter's mean post-ReLU activation, and class counts (K,).

    `x` are uint8 images, `y` global labels; the model runs where `x` is, at `precision`
    (`cadfl.device.precision`), and the sums stay there. Sums are float64 so that devices' sums
    add up exactly enough to be merged in the cloud.
    """
    model = build_loaded(spec, state, x.device).eval()
    layers = activation_layers(spec)
    sums = {name: torch.zeros(num_classes, spec.layer(name).out_ch, dtype=torch.float64,
                              device=x.device) for name in layers}
    captured: dict[str, torch.Tensor] = {}
    hooks = [model[j].register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name, j in layers.items()]
    try:
        with torch.inference_mode(), autocast(precision, x.device):
            for start in range(0, len(x), batch_size):
                yb = y[start:start + batch_size]
                model(to_float(x[start:start + batch_size], mean, std))
                for name, out in captured.items():
                    a = out.mean(dim=(2, 3)) if out.dim() == 4 else out
                    sums[name].index_add_(0, yb, a.to(torch.float64))
    finally:
        for h in hooks:
            h.remove()
    return sums, torch.bincount(y, minlength=num_classes).to(torch.float64).cpu()


def class_means(sums: Sums, counts: torch.Tensor) -> Sums:
    """Per-class mean activations from summed statistics (classes with no samples: zero)."""
    return {k: s / counts.clamp_min(1).unsqueeze(1) for k, s in sums.items()}


def preferred_class(means: torch.Tensor) -> torch.Tensor:
    """Each filter's preferred class, argmax over classes of its mean activation (F,)."""
    return means.argmax(0)


def selectivity(means: torch.Tensor) -> float:
    """Layer class-selectivity: mean over filters of (a_max - a_rest) / (a_max + a_rest).

    `a_rest` is the filter's mean activation over the other classes. In [0, 1] for post-ReLU
    activations: 0 for a filter that responds equally to every class, 1 for one that responds
    to a single class only. Filters that never fire count as 0.
    """
    k = means.shape[0]
    a_max = means.max(0).values
    a_rest = (means.sum(0) - a_max) / max(k - 1, 1)
    total = a_max + a_rest
    index = torch.where(total > 0, (a_max - a_rest) / total.clamp_min(1e-12), 0.0)
    return float(index.mean())


def suggest_depth(conv_selectivity: Sequence[float], threshold: float) -> int:
    """Decoupling depth (conv layers counted from the end) from per-layer selectivity in depth
    order: decouple from the first conv layer whose selectivity reaches `threshold`; 0 (only
    the classifier) if none does. Shallow, generic layers stay in the shared trunk."""
    for i, s in enumerate(conv_selectivity):
        if s >= threshold:
            return len(conv_selectivity) - i
    return 0
