"""Activation maximisation: draw what a filter responds to.

From random noise `x`, repeat `x <- r_theta(x + eta * dA_f(x)/dx)` (Erhan et al. 2009; Yosinski
et al. 2015), where `A_f` is filter f's mean activation (its pre-ReLU response, so the gradient
never vanishes) and the regulariser `r_theta` keeps the image natural: L2 decay shrinks it
toward the data mean, a Gaussian blur every few steps removes high-frequency noise, a random
jitter (shift) each step makes the pattern robust to translation, and clipping keeps pixels in
the data range. Many filters are drawn at once, one image each, in one batched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device.precision import autocast
from ..models import ModelSpec


@dataclass(frozen=True)
class Regularizer:
    """r_theta's settings. Defaults give recognisable patterns on a CIFAR-10 model."""

    decay: float = 0.01  # L2 decay: x <- (1 - decay) * x each step
    blur_every: int = 4  # Gaussian blur every this many steps (0: never)
    blur_sigma: float = 0.5  # its standard deviation, in pixels
    jitter: int = 2  # random shift of up to this many pixels each step
    clip: bool = True  # clip pixels to the data range [0, 1] (after de-normalising)


def response_module(spec: ModelSpec, layer: str) -> int:
    """Index of the module whose output is `layer`'s pre-ReLU response (its batch norm if it
    has one, else the layer itself)."""
    if layer not in spec.names or spec.layer(layer).kind not in ("conv", "linear"):
        convs = [n for n, lay in zip(spec.names, spec.layers, strict=True)
                 if lay.kind in ("conv", "linear")]
        raise ValueError(f"no conv or linear layer {layer!r}; layers: {', '.join(convs)}")
    i = spec.names.index(layer)
    if i + 1 < len(spec.layers) and spec.layers[i + 1].kind == "bn":
        return i + 1
    return i


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(
        c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(
        c, 1, -1, 1), groups=c)


def filter_responses(model: nn.Sequential, index: int, x: torch.Tensor) -> torch.Tensor:
    """Mean response (N, F) of every filter of module `index` to images `x` (normalised)."""
    out = model[: index + 1](x)
    return out.mean(dim=(2, 3)) if out.dim() == 4 else out


def maximize(model: nn.Sequential, spec: ModelSpec, layer: str, filters: list[int],
             mean: tuple[float, ...], std: tuple[float, ...], steps: int = 100,
             eta: float = 1.0, reg: Regularizer = Regularizer(), seed: int = 0,
             progress=None, precision: str = "fp32") -> torch.Tensor:
    """Images (len(filters), C, H, W) in [0, 1], image i maximising filter `filters[i]`.

    `eta` is the step size on the gradient normalised to unit mean magnitude, in units of the
    data's standard deviation. `progress`, if given, is called once per step. The images are
    computed where the model is; the random draws come from a CPU generator, so the starting
    images and shifts are the same on every device. The forward pass runs at `precision`
    (`cadfl.device.precision`); the images and their updates stay float32. Returned on the CPU.
    """
    index = response_module(spec, layer)
    model.eval()
    dev = next(model.parameters()).device
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    low, high = (0 - m) / s, (1 - m) / s
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(len(filters), *spec.input_shape, generator=g) * 0.2).to(dev)
    target = torch.tensor(filters, device=dev)
    rows = torch.arange(len(filters), device=dev)
    for step in range(steps):
        dx, dy = (torch.randint(-reg.jitter, reg.jitter + 1, (2,), generator=g).tolist()
                  if reg.jitter else (0, 0))
        xj = torch.roll(x, (dy, dx), dims=(2, 3)).requires_grad_(True)
        with autocast(precision, dev):
            response = filter_responses(model, index, xj)[rows, target].float().sum()
        (grad,) = torch.autograd.grad(response, xj)
        grad = torch.roll(grad, (-dy, -dx), dims=(2, 3))
        scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            x = (x + eta * 0.1 * grad / scale) * (1 - reg.decay)
            if reg.blur_every and (step + 1) % reg.blur_every == 0:
                x = _blur(x, reg.blur_sigma)
            if reg.clip:
                x = torch.maximum(torch.minimum(x, high), low)
        if progress:
            progress()
    return (x * s + m).clamp(0, 1).cpu()
