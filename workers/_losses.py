"""Segmentation losses, selected by name and combined with weights, and class weights.

A loss is ``pixel_weight * pixel_term + dice_weight * dice_term``, where the name picks the terms:

====================  =====================================================================
``ce``                cross-entropy (class weights, ignore index)
``focal``             focal loss, ``-(1 - p_t)^gamma log p_t`` (class weights, ignore index)
``ohem``              cross-entropy over the hardest ``k`` percent of the valid pixels only
``dice``              soft Dice, per image
``ce_dice`` etc.      ``ce``, ``focal`` or ``ohem`` plus ``dice``
====================  =====================================================================

Reductions. The pixel terms are weighted means over the non-ignored pixels of the batch:
``sum(w_i * l_i) / sum(w_i)`` with ``w_i`` the class weight of pixel ``i``'s true class (torch's
``cross_entropy`` convention, so with class weights of 1 it is the plain mean). The Dice term is
computed per image and class, averaged over classes, then over images.

Soft Dice. For image ``n`` and class ``c`` with softmax probabilities ``p`` and one-hot truth
``t`` over the non-ignored pixels, ``dice = (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with
``s = dice_smooth`` (default 1 pixel). A class with no pixels in the target and none (no
probability mass) in the prediction therefore scores 1, a perfect score: an image that rightly
shows no car is not penalised for it. A class absent from the target but predicted with mass
``P`` scores ``s / (P + s)``, so spurious predictions still cost. Computing Dice per image (not
over the batch) keeps a small object in one image from being swamped by a large one in another,
and makes the loss of an image independent of the batch it was drawn in.

OHEM (online hard example mining) as in DeepLab's training: the fraction of pixels kept starts at
1 (plain cross-entropy) and falls linearly to ``ohem_top_k_min`` over ``ohem_anneal_steps``
optimiser steps; the pixels kept are those with the largest (class-weighted) loss.

Class weights (``class_weights``): computed from the labeled set's pixel counts by
:func:`class_weights_from_counts`, capped at ``class_weight_cap``; they weight the pixel terms.
The Dice term averages classes equally and takes no class weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSS_NAMES",
    "LossSpec",
    "SegmentationLoss",
    "class_pixel_counts",
    "mask_class_counts",
    "pixel_statistics",
    "rare_image_factors",
    "class_weights_from_counts",
    "cross_entropy_per_image",
    "dice_loss_per_image",
    "ohem_fraction",
]

_PIXEL_TERMS = ("ce", "focal", "ohem")
LOSS_NAMES = ("ce", "dice", "ce_dice", "focal", "focal_dice", "ohem", "ohem_dice")
CLASS_WEIGHT_MODES = ("none", "inverse", "median")
IMBALANCE_SAMPLING = ("rare_images", "none")


@dataclass(frozen=True)
class LossSpec:
    """The loss of a training run (mirrors ``train.loss`` of the config)."""

    name: str = "ce"
    """One of ``LOSS_NAMES``: ``ce``, ``dice``, ``focal``, ``ohem``, or ``<ce|focal|ohem>_dice``."""
    pixel_weight: float = 1.0
    """Weight of the pixel term (cross-entropy, focal or OHEM) in a combined loss."""
    dice_weight: float = 1.0
    """Weight of the Dice term in a combined loss (or alone)."""
    class_weights: str = "none"
    """``none``, ``inverse`` (inverse pixel frequency) or ``median`` (median-frequency balancing)."""
    class_weight_cap: float = 10.0
    """Upper bound on any class weight, so a class with a handful of pixels cannot dominate."""
    focal_gamma: float = 2.0
    ohem_top_k_min: float = 0.25
    """Fraction of the valid pixels OHEM keeps once annealed (0 < k <= 1)."""
    ohem_anneal_steps: int = 500
    """Optimiser steps over which OHEM's kept fraction falls from 1 to ``ohem_top_k_min``."""
    dice_smooth: float = 1.0
    """Added to the Dice numerator and denominator, in pixels."""
    imbalance: str = "auto"
    """``auto``: when the rarest class present in the labeled set holds under ``imbalance_threshold``
    of its labeled pixels, train with ``imbalance_loss`` and ``imbalance_class_weights`` instead
    (:func:`choose_loss`); ``off``: always ``name`` and ``class_weights``."""
    imbalance_threshold: float = 0.01
    imbalance_loss: str = "ce"
    imbalance_class_weights: str = "median"
    imbalance_sampling: str = "rare_images"
    """``rare_images``: in an imbalanced run, images holding a rare class are also drawn more often
    (:func:`rare_image_factors`); ``none``: drawn by their sample weights only."""

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.name!r}; valid: {', '.join(LOSS_NAMES)}")
        if self.class_weights not in CLASS_WEIGHT_MODES:
            raise ValueError(
                f"loss class_weights {self.class_weights!r}; valid: {', '.join(CLASS_WEIGHT_MODES)}"
            )
        if self.imbalance not in ("auto", "off"):
            raise ValueError(f"loss imbalance {self.imbalance!r}; valid: auto, off")
        if self.imbalance_sampling not in IMBALANCE_SAMPLING:
            raise ValueError(f"loss imbalance_sampling {self.imbalance_sampling!r}; valid: {', '.join(IMBALANCE_SAMPLING)}")
        if self.imbalance_loss not in LOSS_NAMES or self.imbalance_class_weights not in CLASS_WEIGHT_MODES:
            raise ValueError(f"loss imbalance recipe {self.imbalance_loss!r} with {self.imbalance_class_weights!r}: "
                             f"valid losses {', '.join(LOSS_NAMES)}, class weights {', '.join(CLASS_WEIGHT_MODES)}")
        if not 0.0 < self.ohem_top_k_min <= 1.0:
            raise ValueError(f"loss ohem_top_k_min must be in (0, 1], got {self.ohem_top_k_min}")
        checks = {
            "pixel_weight": self.pixel_weight >= 0,
            "dice_weight": self.dice_weight >= 0,
            "class_weight_cap": self.class_weight_cap > 0,
            "focal_gamma": self.focal_gamma >= 0,
            "ohem_anneal_steps": self.ohem_anneal_steps >= 0,
            "dice_smooth": self.dice_smooth > 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"loss {bad[0]} out of range: {getattr(self, bad[0])!r}")

    @property
    def pixel_term(self) -> str | None:
        """``ce``, ``focal``, ``ohem`` or None (Dice alone)."""
        head = self.name.split("_")[0]
        return head if head in _PIXEL_TERMS else None

    @property
    def uses_dice(self) -> bool:
        return self.name == "dice" or self.name.endswith("_dice")


def ohem_fraction(step: int | None, top_k_min: float, anneal_steps: int) -> float:
    """Fraction of pixels OHEM keeps at optimiser step ``step`` (None = fully annealed).

    Linear from 1 at step 0 to ``top_k_min`` at ``anneal_steps`` (DeepLab's
    ``hard_example_mining_step``), constant after.
    """
    if step is None or anneal_steps <= 0:
        return top_k_min
    ratio = min(1.0, step / anneal_steps)
    return ratio * top_k_min + (1.0 - ratio)


def dice_loss_per_image(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, smooth: float = 1.0
) -> torch.Tensor:
    """``1 - soft Dice`` of every image: float32 ``[N]``.

    ``logits``: ``[N, C, H, W]``; ``target``: int ``[N, H, W]``. See the module docstring for the
    per-image, per-class definition and why a class absent from target and prediction scores 1.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1)
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)  # [N, 1, H, W]
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target).long(), num_classes)
    onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid
    probs = probs * valid
    inter = (probs * onehot).sum((2, 3))
    denom = probs.sum((2, 3)) + onehot.sum((2, 3))
    dice = (2.0 * inter + smooth) / (denom + smooth)  # [N, C]
    return 1.0 - dice.mean(1)


def cross_entropy_per_image(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean pixel cross-entropy (nats, no class weights) of every image: float32 ``[N]``; NaN for
    an image whose pixels are all ignored.

    The per-sample signal of the training worker: comparable across loss configurations and rounds.
    """
    loss = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).sum((1, 2))
    return torch.where(valid > 0, loss.sum((1, 2)) / valid.clamp_min(1), torch.full_like(loss[:, 0, 0], float("nan")))


class SegmentationLoss(nn.Module):
    """The configured loss. ``forward(logits, target, step)`` gives the batch loss (a scalar);
    ``per_image(logits, target)`` the loss of each image (``[N]``) with OHEM fully annealed.

    ``logits``: ``[N, C, H, W]`` (cast to float32 here, so it is safe under autocast);
    ``target``: int ``[N, H, W]`` with ``ignore_index`` for unlabeled pixels.
    """

    def __init__(
        self,
        spec: LossSpec,
        num_classes: int,
        ignore_index: int,
        class_weights: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights is not None and weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(weights.shape)}")
        self.register_buffer("class_weights", weights)

    def _pixel_losses(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-weighted per-pixel losses and the weights, both ``[N, H, W]`` (0 where ignored)."""
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0).long()
        logp = F.log_softmax(logits.float(), 1)
        logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        cw: torch.Tensor | None = self.class_weights  # type: ignore[assignment]  # a buffer or None
        weight = (cw[safe] if cw is not None else torch.ones_like(logp_t)) * valid
        if self.spec.pixel_term == "focal":
            loss = -((1.0 - logp_t.exp()).clamp_min(0) ** self.spec.focal_gamma) * logp_t
        else:
            loss = -logp_t
        return loss * weight, weight

    def _pixel_term(self, logits: torch.Tensor, target: torch.Tensor, step: int | None) -> torch.Tensor:
        loss, weight = self._pixel_losses(logits, target)
        if self.spec.pixel_term != "ohem":
            return loss.sum() / weight.sum().clamp_min(1e-12)
        return self._ohem(loss.flatten(), weight.flatten(), step)

    def _ohem(self, loss: torch.Tensor, weight: torch.Tensor, step: int | None) -> torch.Tensor:
        valid = weight > 0
        n_valid = int(valid.sum())
        if n_valid == 0:
            return loss.sum() * 0.0
        fraction = ohem_fraction(step, self.spec.ohem_top_k_min, self.spec.ohem_anneal_steps)
        k = max(1, math.ceil(fraction * n_valid))
        if k >= n_valid:
            return loss.sum() / weight.sum()
        # Ignored pixels rank last (-inf) and are never kept.
        top = torch.topk(torch.where(valid, loss, -math.inf), k).indices
        return loss[top].sum() / weight[top].sum().clamp_min(1e-12)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, step: int | None = None) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        if self.spec.pixel_term is not None:
            total = total + self.spec.pixel_weight * self._pixel_term(logits, target, step)
        if self.spec.uses_dice:
            dice = dice_loss_per_image(logits, target, self.ignore_index, self.spec.dice_smooth)
            total = total + self.spec.dice_weight * dice.mean()
        return total

    @torch.no_grad()
    def per_image(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """float32 ``[N]``: the loss of each image alone (NaN for an image whose pixels are all
        ignored and that has a pixel term)."""
        n = logits.shape[0]
        total = torch.zeros(n, dtype=torch.float32, device=logits.device)
        if self.spec.pixel_term is not None:
            loss, weight = self._pixel_losses(logits, target)
            if self.spec.pixel_term == "ohem":
                per = [self._ohem(loss[i].flatten(), weight[i].flatten(), None) for i in range(n)]
                term = torch.stack(per)
            else:
                term = loss.sum((1, 2)) / weight.sum((1, 2))
            # An image with nothing labeled has no loss: NaN (0 / 0 above), kept.
            term = torch.where(weight.sum((1, 2)) > 0, term, torch.full_like(term, float("nan")))
            total = total + self.spec.pixel_weight * term
        if self.spec.uses_dice:
            dice = dice_loss_per_image(logits, target, self.ignore_index, self.spec.dice_smooth)
            total = total + self.spec.dice_weight * dice
        return total


def class_pixel_counts(
    masks: Iterable[tuple[torch.Tensor | np.ndarray, float]], num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel statistics of a labeled set, for :func:`class_weights_from_counts`.

    ``masks`` yields ``(mask [H, W] int, sample weight)``. Returns float64 ``[C]`` arrays
    ``(pixels, image_pixels)``: ``pixels[c]`` = sum over masks of weight x pixels of class ``c``;
    ``image_pixels[c]`` = sum of weight x non-ignored pixels over the masks where ``c`` occurs.
    Both are sums, so shards of a set can be counted apart and added (across DDP ranks).
    """
    pairs = list(masks)
    counts = np.stack([mask_class_counts(m, num_classes, ignore_index) for m, _ in pairs]) if pairs \
        else np.zeros((0, num_classes))
    return pixel_statistics(counts, np.asarray([w for _, w in pairs], dtype=np.float64))


def mask_class_counts(mask: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """float64 ``[C]``: the pixels of each class in ``mask`` (ignored pixels left out)."""
    m = torch.as_tensor(mask).reshape(-1)
    m = m[m != ignore_index].long()
    return torch.bincount(m, minlength=num_classes)[:num_classes].double().numpy()


def pixel_statistics(counts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_pixel_counts`'s ``(pixels, image_pixels)`` from per-image class pixel counts
    ``counts`` [N, C] and sample weights ``weights`` [N]."""
    counts = np.asarray(counts, dtype=np.float64).reshape(len(weights), -1)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    pixels = (w * counts).sum(0)
    image_pixels = (w * np.where(counts > 0, counts.sum(1, keepdims=True), 0.0)).sum(0)
    return pixels, image_pixels


def rare_image_factors(counts: np.ndarray, pixels: np.ndarray, threshold: float, max_ratio: float) -> np.ndarray:
    """float64 [N]: how much more often each image is drawn in an imbalanced run. The rare classes
    are those present under ``threshold`` of the labeled ``pixels`` (per class, [C]); an image
    holding one weighs ``f_max / f_c`` of its rarest (``f`` the classes' pixel shares), capped at
    ``max_ratio``, any other image 1; scaled to mean 1. ``counts`` [N, C]: each image's class pixels.
    On a two-class set this is the ``class_content`` reweighting policy, which on KolektorSDD with 2
    defect images of 20 roughly doubled the defect IoU (benchmarks/results/rare_recipe_first_round.md);
    limited to the rare classes, so that on many-class data the images with a class under the
    threshold stand out instead of every image holding some class 10x rarer than the commonest."""
    counts = np.asarray(counts, dtype=np.float64)
    pixels = np.asarray(pixels, dtype=np.float64)
    total = pixels.sum()
    if not len(counts) or total <= 0:
        return np.ones(len(counts))
    share = pixels / total
    rare = (share > 0) & (share < threshold)
    with np.errstate(divide="ignore"):
        ratio = np.where(rare, np.minimum(share.max() / np.where(share > 0, share, 1.0), max_ratio), 1.0)
    factors = np.where(counts > 0, ratio[None, :], 1.0).max(axis=1)
    return factors / factors.mean()


def class_weights_from_counts(pixels: np.ndarray, image_pixels: np.ndarray, mode: str, cap: float) -> np.ndarray | None:
    """Class weights float64 ``[C]`` from :func:`class_pixel_counts` (None for mode ``none``).

    ``inverse``: ``w_c = mean_f / f_c`` with ``f_c`` the share of all labeled pixels in class ``c``
    and ``mean_f = 1 / (number of classes present)``: a class of average frequency weighs 1.
    ``median``: median-frequency balancing (Eigen & Fergus 2015), ``w_c = median(f) / f_c`` with
    ``f_c`` = pixels of ``c`` / pixels of the images where ``c`` occurs.
    Every weight is capped at ``cap``; a class with no labeled pixels gets ``cap`` (its weight
    never multiplies a target pixel, so the value only matters once it is labeled).
    """
    if mode == "none":
        return None
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class weights {mode!r}; valid: {', '.join(CLASS_WEIGHT_MODES)}")
    pixels = np.asarray(pixels, np.float64)
    present = pixels > 0
    weights = np.full(pixels.shape, float(cap))
    if not present.any():
        return weights
    if mode == "inverse":
        freq = pixels[present] / pixels.sum()
        weights[present] = (1.0 / present.sum()) / freq
    else:
        freq = pixels[present] / np.asarray(image_pixels, np.float64)[present]
        weights[present] = np.median(freq) / freq
    return np.minimum(weights, cap)


def choose_loss(spec: LossSpec, class_pixels: Any, class_names: Any = None) -> tuple[LossSpec, dict[str, Any]]:
    """The loss a run trains with, and why: the configured one, or, with ``spec.imbalance: auto``
    and a labeled set whose rarest present class holds under ``spec.imbalance_threshold`` of its
    pixels (``class_pixels``: counts per class id), the rare-class recipe (``imbalance_loss`` with
    ``imbalance_class_weights``). Plain cross-entropy on such a set learns to predict the majority
    class everywhere (benchmarks/results/rare_recipe.md)."""
    import dataclasses

    pixels = np.asarray(class_pixels, dtype=np.float64)
    total = pixels.sum()
    present = np.flatnonzero(pixels > 0)
    info: dict[str, Any] = {"recipe": "configured", "loss": spec.name, "class_weights": spec.class_weights,
                            "rarest_class": None, "rarest_share": None}
    if total <= 0 or not len(present):
        return spec, info
    rarest = int(present[np.argmin(pixels[present])])
    share = float(pixels[rarest] / total)
    info.update(rarest_class=rarest if class_names is None else str(class_names[rarest]), rarest_share=share)
    if spec.imbalance != "auto" or share >= spec.imbalance_threshold or len(present) < 2:
        return spec, info
    chosen = dataclasses.replace(spec, name=spec.imbalance_loss, class_weights=spec.imbalance_class_weights)
    info.update(recipe="imbalance", loss=chosen.name, class_weights=chosen.class_weights)
    return chosen, info
