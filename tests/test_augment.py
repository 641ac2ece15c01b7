"""Augmentations keep image and mask aligned: every mask pixel still labels the image content it
labelled before (checked on images whose colour encodes their class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers._augment import IMAGENET_MEAN, Augmenter, AugmentSpec

torch.set_num_threads(1)
IGNORE = 255
PALETTE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
OFF = AugmentSpec(hflip=False)


def coded_sample(h: int = 24, w: int = 40, block: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask of ``block``-pixel squares of random classes, and an image painting each class its colour."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, len(PALETTE), (h // block, w // block), generator=g)
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = (PALETTE[mask].permute(2, 0, 1) * 255).round().to(torch.uint8)
    return image, mask


def decode(image: torch.Tensor) -> torch.Tensor:
    """The class whose colour is nearest to each pixel, and how near: ([H, W], [H, W])."""
    dist = ((image.permute(1, 2, 0)[:, :, None, :] - PALETTE) ** 2).sum(-1)
    best = dist.min(-1)
    return best.indices, best.values


def test_nothing_on_means_no_change() -> None:
    image, mask = coded_sample()
    assert not OFF.active
    x, y = Augmenter(OFF, IGNORE, seed=0)(image, mask)
    assert torch.equal(y, mask) and torch.allclose(x, image.float() / 255)


@pytest.mark.parametrize(
    "spec", [AugmentSpec(hflip=True), AugmentSpec(hflip=False, vflip=True), AugmentSpec(hflip=False, hroll=True)]
)
def test_flips_and_roll_move_image_and_mask_exactly_together(spec: AugmentSpec) -> None:
    image, mask = coded_sample()
    augmenter = Augmenter(spec, IGNORE, seed=1)
    changed = 0
    for _ in range(8):
        x, y = augmenter(image, mask)
        assert torch.equal(decode(x)[0], y)
        changed += int(not torch.equal(y, mask))
    assert changed >= 2  # the transform does happen


def test_horizontal_roll_is_circular() -> None:
    image, mask = coded_sample()
    x, y = Augmenter(AugmentSpec(hflip=False, hroll=True), IGNORE, seed=3)(image, mask)
    shifts = [s for s in range(mask.shape[1]) if torch.equal(torch.roll(mask, s, dims=1), y)]
    assert shifts and torch.allclose(torch.roll(image.float() / 255, shifts[0], dims=2), x)
    assert sorted(y.flatten().tolist()) == sorted(mask.flatten().tolist())  # nothing cut off


@pytest.mark.parametrize("scale", [(0.5, 0.8), (1.3, 2.0), (0.6, 1.6)])
def test_random_scale_and_crop_keep_alignment(scale: tuple[float, float]) -> None:
    image, mask = coded_sample(h=32, w=48, block=8)
    augmenter = Augmenter(AugmentSpec(scale_range=scale, crop=(20, 28)), IGNORE, seed=2)
    for _ in range(6):
        x, y = augmenter(image, mask)
        assert x.shape == (3, 20, 28) and y.shape == (20, 28) and y.dtype == torch.int64
        cls, dist = decode(x)
        labeled = y != IGNORE
        pure = labeled & (dist < 1e-3)  # away from blended block edges
        assert pure.float().mean() > 0.25
        assert torch.equal(cls[pure], y[pure])
        # colours blended at an edge belong to one of the classes around that pixel
        assert (cls[labeled] == y[labeled]).float().mean() > 0.9
        # padding (scaled image smaller than the crop) is ignored and mean-coloured
        padded = ~labeled
        if padded.any():
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
            assert torch.allclose(x[:, padded], mean.expand(3, int(padded.sum())), atol=1e-5)


def test_color_jitter_changes_the_image_only() -> None:
    image, mask = coded_sample()
    image = (image.float() * 0.6 + 40).to(torch.uint8)  # room to move both ways
    x, y = Augmenter(AugmentSpec(hflip=False, color_jitter=0.4), IGNORE, seed=0)(image, mask)
    assert torch.equal(y, mask)
    assert not torch.allclose(x, image.float() / 255)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_same_seed_same_augmentations() -> None:
    image, mask = coded_sample()
    spec = AugmentSpec(vflip=True, hroll=True, scale_range=(0.7, 1.4), color_jitter=0.3)
    a, b = Augmenter(spec, IGNORE, seed=9), Augmenter(spec, IGNORE, seed=9)
    for _ in range(3):
        (xa, ya), (xb, yb) = a(image, mask), b(image, mask)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = Augmenter(spec, IGNORE, seed=10)
    assert any(not torch.equal(c(image, mask)[1], a(image, mask)[1]) for _ in range(3))


def test_scaling_without_crop_keeps_the_size() -> None:
    image, mask = coded_sample()
    x, y = Augmenter(AugmentSpec(scale_range=(1.5, 1.5)), IGNORE, seed=0)(image, mask)
    assert x.shape == (3, 24, 40) and y.shape == (24, 40)
    assert np.isin(y.unique().numpy(), np.arange(len(PALETTE))).all()  # zoomed in: no padding


@pytest.mark.parametrize(
    "changes, message",
    [({"scale_range": (2.0, 1.0)}, "scale_range"), ({"crop": (0, 4)}, "crop"), ({"color_jitter": 1.0}, "color_jitter")],
)
def test_bad_augment_spec(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AugmentSpec(**changes)
