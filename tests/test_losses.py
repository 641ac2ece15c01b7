"""Losses: cross-entropy, soft Dice per image, focal, OHEM with annealing, combinations, and class
weights from pixel counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers._losses import (
    LossSpec,
    SegmentationLoss,
    class_pixel_counts,
    class_weights_from_counts,
    cross_entropy_per_image,
    dice_loss_per_image,
    ohem_fraction,
)

torch.set_num_threads(1)
IGNORE = 255


def batch(seed: int = 0, n: int = 3, c: int = 4, h: int = 6, w: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[0, 0, :3] = IGNORE
    return logits, target


def confident(target: torch.Tensor, c: int, margin: float = 30.0) -> torch.Tensor:
    """Logits predicting ``target`` with near certainty (ignored pixels predicted as class 0)."""
    return F.one_hot(torch.where(target == IGNORE, 0, target), c).permute(0, 3, 1, 2).float() * margin


def test_cross_entropy_with_class_weights_and_ignore_index() -> None:
    logits, target = batch()
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    loss = SegmentationLoss(LossSpec(name="ce"), 4, IGNORE, weights)
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    assert float(loss(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    plain = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    per_image = cross_entropy_per_image(logits, target, IGNORE)
    valid = (target != IGNORE).sum((1, 2))
    assert per_image.tolist() == pytest.approx((plain.sum((1, 2)) / valid).tolist(), rel=1e-6)
    all_ignored = torch.full_like(target[:1], IGNORE)
    assert math.isnan(float(cross_entropy_per_image(logits[:1], all_ignored, IGNORE)[0]))


def test_dice_is_per_image_and_absent_classes_score_perfectly() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, :4] = 1  # image 0: classes 0 and 1; image 1: class 0 only; class 2 nowhere
    perfect = confident(target, 3)
    assert dice_loss_per_image(perfect, target, IGNORE).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    # predicting class 2 in a corner of image 1, where it is absent, costs that image only
    wrong = perfect.clone()
    wrong[1, :, 0, 0] = torch.tensor([0.0, 0.0, 30.0])
    per_image = dice_loss_per_image(wrong, target, IGNORE)
    assert per_image[0] == pytest.approx(0.0, abs=1e-6)
    # class 0: (2*63 + 1) / (63 + 64 + 1); class 1: (0 + 1) / (0 + 0 + 1); class 2: 1 / (1 + 1)
    expected = 1 - (127 / 128 + 1.0 + 0.5) / 3
    assert float(per_image[1]) == pytest.approx(expected, rel=1e-4)
    # the batch loss is the mean of the images' losses, whatever they are batched with
    loss = SegmentationLoss(LossSpec(name="dice"), 3, IGNORE)
    assert float(loss(wrong, target)) == pytest.approx(float(per_image.mean()), rel=1e-6)
    assert float(loss(wrong[1:], target[1:])) == pytest.approx(float(per_image[1]), rel=1e-6)


def test_dice_ignores_ignored_pixels_and_has_gradients() -> None:
    logits, target = batch()
    logits.requires_grad_(True)
    loss = SegmentationLoss(LossSpec(name="dice"), 4, IGNORE)(logits, target)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.all(logits.grad[0, :, 0, :3] == 0)  # ignored pixels get no gradient
    # whatever is predicted at ignored pixels does not change the loss
    other = logits.detach().clone()
    other[0, :, 0, :3] = torch.randn(4, 3)
    assert float(dice_loss_per_image(other, target, IGNORE)[0]) == pytest.approx(
        float(dice_loss_per_image(logits.detach(), target, IGNORE)[0]), rel=1e-6
    )


def test_focal_is_cross_entropy_at_gamma_0_and_down_weights_easy_pixels() -> None:
    logits, target = batch()
    ce = SegmentationLoss(LossSpec(name="ce"), 4, IGNORE)(logits, target)
    focal0 = SegmentationLoss(LossSpec(name="focal", focal_gamma=0.0), 4, IGNORE)(logits, target)
    assert float(focal0) == pytest.approx(float(ce), rel=1e-6)
    focal2 = SegmentationLoss(LossSpec(name="focal", focal_gamma=2.0), 4, IGNORE)(logits, target)
    assert float(focal2) < float(ce)
    p_t = logits.softmax(1).gather(1, torch.where(target == IGNORE, 0, target)[:, None])[:, 0]
    valid = target != IGNORE
    by_hand = (-((1 - p_t) ** 2) * p_t.log())[valid].mean()
    assert float(focal2) == pytest.approx(float(by_hand), rel=1e-5)


def test_ohem_anneals_from_all_pixels_to_the_hardest_k_percent() -> None:
    assert ohem_fraction(0, 0.25, 100) == 1.0
    assert ohem_fraction(50, 0.25, 100) == pytest.approx(0.625)
    assert ohem_fraction(100, 0.25, 100) == ohem_fraction(10_000, 0.25, 100) == 0.25
    assert ohem_fraction(None, 0.25, 100) == 0.25
    logits, target = batch()
    spec = LossSpec(name="ohem", ohem_top_k_min=0.25, ohem_anneal_steps=100)
    loss = SegmentationLoss(spec, 4, IGNORE)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    valid = ce[target != IGNORE]
    assert float(loss(logits, target, step=0)) == pytest.approx(float(valid.mean()), rel=1e-6)
    k = math.ceil(0.25 * valid.numel())
    hardest = valid.sort(descending=True).values[:k]
    assert float(loss(logits, target, step=100)) == pytest.approx(float(hardest.mean()), rel=1e-6)
    assert float(loss(logits, target, step=100)) > float(loss(logits, target, step=50)) > float(valid.mean())


def test_ohem_never_keeps_ignored_pixels() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[0, IGNORE], [IGNORE, IGNORE]]])
    loss = SegmentationLoss(LossSpec(name="ohem", ohem_top_k_min=0.1, ohem_anneal_steps=0), 2, IGNORE)
    assert float(loss(logits, target, step=5)) == pytest.approx(math.log(2))


def test_combined_loss_is_the_weighted_sum() -> None:
    logits, target = batch()
    ce = SegmentationLoss(LossSpec(name="ce"), 4, IGNORE)(logits, target)
    dice = SegmentationLoss(LossSpec(name="dice"), 4, IGNORE)(logits, target)
    both = SegmentationLoss(LossSpec(name="ce_dice", pixel_weight=0.3, dice_weight=2.0), 4, IGNORE)(logits, target)
    assert float(both) == pytest.approx(0.3 * float(ce) + 2.0 * float(dice), rel=1e-6)
    per_image = SegmentationLoss(LossSpec(name="ce_dice"), 4, IGNORE).per_image(logits, target)
    expected = cross_entropy_per_image(logits, target, IGNORE) + dice_loss_per_image(logits, target, IGNORE)
    assert per_image.tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_class_weights_from_pixel_counts() -> None:
    masks = [np.array([[0, 0, 0, 1]]), np.array([[0, 0, 2, IGNORE]])]
    pixels, image_pixels = class_pixel_counts(((m, 1.0) for m in masks), 4, IGNORE)
    assert pixels.tolist() == [5, 1, 1, 0] and image_pixels.tolist() == [7, 4, 3, 0]
    inverse = class_weights_from_counts(pixels, image_pixels, "inverse", cap=100.0)
    assert inverse is not None
    # shares 5/7, 1/7, 1/7 over 3 present classes: weight = (1/3) / share
    assert inverse[:3] == pytest.approx([7 / 15, 7 / 3, 7 / 3]) and inverse[3] == 100.0
    median = class_weights_from_counts(pixels, image_pixels, "median", cap=100.0)
    assert median is not None  # f = 5/7, 1/4, 1/3; median 1/3
    assert median[:3] == pytest.approx([(1 / 3) / (5 / 7), (1 / 3) / (1 / 4), 1.0])
    capped = class_weights_from_counts(pixels, image_pixels, "inverse", cap=2.0)
    assert capped is not None and capped.max() == 2.0
    assert class_weights_from_counts(pixels, image_pixels, "none", cap=2.0) is None
    # weighted samples count proportionally; shards add up
    weighted, _ = class_pixel_counts([(masks[0], 2.0), (masks[1], 1.0)], 4, IGNORE)
    assert weighted.tolist() == [8, 2, 1, 0]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "lovasz"}, "unknown loss 'lovasz'"),
        ({"class_weights": "sqrt"}, "class_weights 'sqrt'"),
        ({"ohem_top_k_min": 0.0}, "ohem_top_k_min"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
    ],
)
def test_bad_loss_spec(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossSpec(**changes)
