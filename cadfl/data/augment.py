"""Batched image augmentation and normalisation on tensors (no torchvision, no per-image loops)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def to_float(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Convert a uint8 batch (B, C, H, W) to float32 `(x / 255 - mean) / std` per channel.

    The memory format of `x` (e.g. channels_last) is kept.
    """
    # (x/255 - m)/s == (x - 255m) / (255s): two in-place ops on the fresh float copy.
    shift = torch.tensor(mean, dtype=torch.float32, device=x.device).mul_(255).view(1, -1, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32, device=x.device).mul_(255).view(1, -1, 1, 1)
    return x.to(torch.float32).sub_(shift).div_(scale)


def crop_flip_draws(b: int, padding: int, flip: bool, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The random draws of `random_crop_flip` for a batch of `b` images, in its order: row
    offsets (b, 1), column offsets (b, 1), and with `flip` a (b, 1) mirror mask (else None),
    on the generator's device."""
    dev = generator.device
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    mirror = torch.rand(b, 1, generator=generator, device=dev) < 0.5 if flip else None
    return dy, dx, mirror


def crop_flip(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor,
              mirror: torch.Tensor | None) -> torch.Tensor:
    """Crop every image of a float batch (B, C, H, W), zero-padded by `padding`, at offsets
    `dy`, `dx` (B, 1) and mirror those where `mirror` (B, 1) is true (None: none).

    The output keeps channels_last if `x` has it.
    """
    b, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    cols = dx + torch.arange(w, device=dx.device)
    if mirror is not None:
        cols = torch.where(mirror, cols.flip(1), cols)
    rows = dy + torch.arange(h, device=dy.device)
    # One gather on the flattened padded image beats two per-axis gathers or 4-d fancy
    # indexing by 2-4x on CPU (about 0.3 ms for 64x3x32x32 on one core).
    index = (rows[:, :, None] * wp + cols[:, None, :]).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    if x.is_contiguous(memory_format=torch.channels_last):
        # Gathered as (B, H*W, C) pixels of the padded image's own memory: the output is
        # channels-last as it stands, with no conversion copy.
        pixels = padded.permute(0, 2, 3, 1).reshape(b, hp * wp, c)
        out = pixels.gather(1, index.view(b, h * w, 1).expand(b, h * w, c))
        return out.view(b, h, w, c).permute(0, 3, 1, 2)
    out = padded.reshape(b, c, hp * wp).gather(2, index.view(b, 1, h * w).expand(b, c, h * w))
    return out.view(b, c, h, w)


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """Random-crop every image of a float batch (B, C, H, W) and randomly mirror it.

    Each image is zero-padded by `padding` on all sides and an H x W window is cut at an
    offset drawn uniformly from 0..2*padding in each axis; with `flip`, each image is
    mirrored left-right with probability 1/2. All random draws come from `generator`
    (on the generator's device), so the output is fixed by its state. `padding=0` with
    `flip=False` returns `x` itself. The output keeps channels_last if `x` has it.
    """
    if padding == 0 and not flip:
        return x
    return crop_flip(x, padding, *crop_flip_draws(len(x), padding, flip, generator))
