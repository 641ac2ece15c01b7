"""Training augmentations that move an image and its mask together.

Geometric transforms (circular horizontal roll, random scale, crop, flips) are applied to both
with the same random draw; the image is resampled bilinearly and the mask by nearest neighbour
with the same pixel-centre convention, so every mask pixel stays on the image content it labels.
Padding (when a scaled image is smaller than the crop) is the mean colour in the image and the
ignore index in the mask, so padded pixels never train. Colour jitter touches the image only.

The augmenter owns a seeded ``torch.Generator``: a worker seeded the same way draws the same
augmentations, whatever else uses torch's global random state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentSpec", "Augmenter", "IMAGENET_MEAN", "IMAGENET_STD", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """float ``[3, H, W]`` (or ``[N, 3, H, W]``) in [0, 1] -> ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.float() - mean) / std


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentations (mirrors ``train.augment`` of the config); all off = none."""

    hflip: bool = True
    """Mirror left-right with probability 1/2."""
    vflip: bool = False
    """Mirror top-bottom with probability 1/2 (downward-looking or texture imagery only)."""
    scale_range: tuple[float, float] = (1.0, 1.0)
    """Resize by a factor drawn uniformly from this range (1, 1 = off)."""
    crop: tuple[int, int] | None = None
    """(height, width) of the random crop taken after scaling (padded when larger than the
    scaled image); None = the image size, which keeps batches stackable when scaling."""
    color_jitter: float = 0.0
    """Strength s: brightness, contrast and saturation factors drawn from [1 - s, 1 + s]."""
    hroll: bool = False
    """Roll the image and mask circularly left-right by a uniform random offset: for 360-degree
    panoramas and unrolled pipe walls, whose left and right edges are neighbours."""

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"augment scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if self.crop is not None and min(self.crop) < 1:
            raise ValueError(f"augment crop must be two positive integers, got {self.crop}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"augment color_jitter must be in [0, 1), got {self.color_jitter}")

    @property
    def active(self) -> bool:
        return (
            self.hflip or self.vflip or self.hroll or self.color_jitter > 0
            or self.scale_range != (1.0, 1.0) or self.crop is not None
        )


class Augmenter:
    """``augmenter(image, mask) -> (image, mask)`` with one random draw for both.

    ``image``: uint8 or float ``[3, H, W]`` (uint8 is scaled to [0, 1]); ``mask``: int ``[H, W]``.
    Returns float32 ``[3, h, w]`` in [0, 1] (not normalised) and int64 ``[h, w]``, where
    ``(h, w)`` is ``spec.crop`` or the input size.
    """

    def __init__(self, spec: AugmentSpec, ignore_index: int, seed: int) -> None:
        self.spec = spec
        self.ignore_index = ignore_index
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def _coin(self) -> bool:
        return bool(torch.rand((), generator=self.generator) < 0.5)

    def _randint(self, high: int) -> int:
        """Uniform in [0, high] inclusive."""
        return int(torch.randint(high + 1, (), generator=self.generator))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        y = mask.long()
        height, width = y.shape
        if spec.hroll:
            shift = self._randint(width - 1)
            x, y = torch.roll(x, shift, dims=-1), torch.roll(y, shift, dims=-1)
        if spec.scale_range != (1.0, 1.0):
            x, y = self._scale(x, y, self._uniform(*spec.scale_range))
        out_h, out_w = spec.crop or (height, width)
        if (out_h, out_w) != tuple(y.shape):
            x, y = self._pad_crop(x, y, out_h, out_w)
        if spec.hflip and self._coin():
            x, y = x.flip(-1), y.flip(-1)
        if spec.vflip and self._coin():
            x, y = x.flip(-2), y.flip(-2)
        if spec.color_jitter > 0:
            x = self._jitter(x, spec.color_jitter)
        return x.contiguous(), y.contiguous()

    def _scale(self, x: torch.Tensor, y: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        size = (max(1, round(y.shape[0] * factor)), max(1, round(y.shape[1] * factor)))
        if size == tuple(y.shape):
            return x, y
        # Bilinear for the image and nearest-exact for the mask share the pixel-centre convention
        # (align_corners=False), so the two stay registered; antialias when shrinking.
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=factor < 1)[0]
        y = F.interpolate(y[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        return x.clamp(0.0, 1.0), y

    def _pad_crop(self, x: torch.Tensor, y: torch.Tensor, out_h: int, out_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = y.shape
        pad_h, pad_w = max(0, out_h - h), max(0, out_w - w)
        if pad_h or pad_w:
            # Pad at a random side so the content is not always top-left.
            top, left = self._randint(pad_h), self._randint(pad_w)
            pads = (left, pad_w - left, top, pad_h - top)
            mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
            x = F.pad(x - mean, pads, value=0.0) + mean
            y = F.pad(y, pads, value=self.ignore_index)
            h, w = y.shape
        top, left = self._randint(h - out_h), self._randint(w - out_w)
        return x[:, top : top + out_h, left : left + out_w], y[top : top + out_h, left : left + out_w]

    def _jitter(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        lo, hi = 1.0 - strength, 1.0 + strength
        x = x * self._uniform(lo, hi)  # brightness
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        x = (x - gray.mean()) * self._uniform(lo, hi) + gray.mean()  # contrast
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        x = (x - gray) * self._uniform(lo, hi) + gray  # saturation
        return x.clamp(0.0, 1.0)
