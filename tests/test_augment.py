"""Batched crop/flip augmentation and normalisation."""

import pytest
import torch
import torch.nn.functional as F

from cadfl.data.augment import random_crop_flip, to_float


def batch(b: int = 16, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))


def test_to_float_normalises_per_channel() -> None:
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    out = to_float(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for c in range(3):
        expected = (x[:, c].double() / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out[:, c].double(), expected, rtol=1e-5, atol=1e-5)


def test_to_float_keeps_channels_last() -> None:
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = to_float(x, (0.5,) * 3, (0.5,) * 3)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.all(out == -1)


def test_identity_without_padding_or_flip() -> None:
    x = batch()
    assert random_crop_flip(x, 0, False, torch.Generator()) is x


@pytest.mark.parametrize(("padding", "flip"), [(0, True), (1, False), (4, True)])
def test_shape_and_determinism(padding: int, flip: bool) -> None:
    x = batch()
    a = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def reference(x: torch.Tensor, padding: int) -> list[list[torch.Tensor]]:
    """Every possible crop/flip result of each image, computed one image at a time."""
    _, _, h, w = x.shape
    out = []
    for img in x:
        padded = F.pad(img, (padding,) * 4)
        crops = [padded[:, i:i + h, j:j + w]
                 for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
        out.append(crops + [crop.flip(-1) for crop in crops])
    return out


@pytest.mark.parametrize(("padding", "flip"), [(0, True), (2, False), (3, True)])
def test_each_image_is_a_shifted_flipped_copy(padding: int, flip: bool) -> None:
    x = batch(b=32)
    out = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(1))
    options = reference(x, padding)
    flipped = 0
    for i in range(len(x)):
        matches = [k for k, cand in enumerate(options[i]) if torch.equal(out[i], cand)]
        assert matches, f"image {i} is not a crop/flip of its input"
        n_crops = len(options[i]) // 2
        flipped += all(k >= n_crops for k in matches)
    if flip:
        assert 4 <= flipped <= 28  # about half of 32 get mirrored
    else:
        assert flipped == 0


def test_offsets_cover_the_whole_range() -> None:
    # A single bright pixel in the centre shows where each crop was taken.
    x = torch.zeros(512, 1, 5, 5)
    x[:, :, 2, 2] = 1
    out = random_crop_flip(x, 2, False, torch.Generator().manual_seed(0))
    positions = {tuple(p) for p in (out[:, 0] == 1).nonzero()[:, 1:].tolist()}
    assert positions == {(i, j) for i in range(5) for j in range(5)}


def test_keeps_channels_last() -> None:
    x = batch().contiguous(memory_format=torch.channels_last)
    a = random_crop_flip(x, 2, True, torch.Generator().manual_seed(3))
    b = random_crop_flip(x.contiguous(), 2, True, torch.Generator().manual_seed(3))
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
