"""Per-image scores computed by the pool scorer's batch function (no Ray needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies import columns as col
from workers import PoolScorer, build_model
from workers._score import class_pixel_weights, uncertainty_columns


def test_uncertainty_of_certain_and_uniform_images() -> None:
    c, h, w = 4, 8, 10
    certain = torch.zeros(1, c, h, w)
    certain[:, 2] = 1.0
    uniform = torch.full((1, c, h, w), 1.0 / c)
    out = uncertainty_columns(torch.cat([certain, uniform]))
    assert out[col.ENTROPY_MEAN] == pytest.approx([0.0, math.log(c)], abs=1e-6)
    assert out[col.MARGIN_MEAN] == pytest.approx([1.0, 0.0])
    assert out[col.LEAST_CONFIDENCE_MEAN] == pytest.approx([0.0, 0.75])
    assert out[col.class_fraction_column(2)][0] == 1.0 and out[col.class_fraction_column(1)][0] == 0.0


def test_classweighted_counts_pixels_predicted_as_a_rare_class_more() -> None:
    # Image A: a confident background, an uncertain patch predicted as background.
    # Image B: the same, but the uncertain patch is predicted as class 1, rare in the labeled set.
    c, h, w = 2, 10, 10
    a = torch.zeros(1, c, h, w)
    a[:, 0] = 1.0
    a[:, 0, :2, :5] = 0.6
    a[:, 1, :2, :5] = 0.4
    b = a.clone()
    b[:, 0, :2, :5] = 0.4
    b[:, 1, :2, :5] = 0.6
    weights = class_pixel_weights([0.99, 0.01])
    assert weights.mean() == pytest.approx(1.0) and weights[1] / weights[0] == pytest.approx(0.991 / 0.011)
    out = uncertainty_columns(torch.cat([a, b]), weights)
    # The plain mean cannot tell them apart; the class-weighted mean ranks B first.
    assert out[col.ENTROPY_MEAN][0] == pytest.approx(out[col.ENTROPY_MEAN][1])
    assert out[col.ENTROPY_CLASSWEIGHTED][1] > 5 * out[col.ENTROPY_CLASSWEIGHTED][0]
    h_patch = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    expected_b = weights[1] * 10 * h_patch / (weights[1] * 10 + weights[0] * 90)
    assert out[col.ENTROPY_CLASSWEIGHTED][1] == pytest.approx(expected_b, rel=1e-6)
    assert out[col.MARGIN_CLASSWEIGHTED][1] < out[col.MARGIN_CLASSWEIGHTED][0]
    with pytest.raises(ValueError, match="class_weights: expected 2 weights"):
        uncertainty_columns(a, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="labeled class shares"):
        class_pixel_weights([0.5, float("nan")])


def test_topk_reveals_a_small_uncertain_region() -> None:
    c, h, w = 3, 20, 20
    probs = torch.zeros(1, c, h, w)
    probs[:, 0] = 1.0
    probs[:, :, :4, :4] = 1.0 / c  # 4% of the pixels are fully uncertain
    out = uncertainty_columns(probs)
    assert out[col.ENTROPY_MEAN][0] == pytest.approx(0.04 * math.log(c), rel=1e-6)
    # the top 10% holds all 16 uncertain pixels and 24 certain ones
    assert out[col.ENTROPY_TOPK][0] == pytest.approx(16 / 40 * math.log(c), rel=1e-6)
    assert out[col.MARGIN_TOPK][0] == pytest.approx(24 / 40, rel=1e-6)
    fractions = [out[col.class_fraction_column(k)][0] for k in range(c)]
    assert sum(fractions) == pytest.approx(1.0)


def test_pool_scorer_batch_returns_only_per_image_numbers(tmp_path) -> None:
    import cv2

    from workers._models import save_model_state

    torch.manual_seed(0)
    model = build_model("unet", 5, {"base_channels": 4, "depth": 2})
    save_model_state(model, tmp_path / "model.pt")
    paths = []
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8))
        paths.append(str(p))
    scorer = PoolScorer(str(tmp_path / "model.pt"), (24, 32))
    out = scorer({"sample_id": np.array(["a", "b", "c"]), "image_path": np.array(paths)})
    assert list(out["sample_id"]) == ["a", "b", "c"]
    assert all(np.asarray(v).shape == (3,) for v in out.values())
    assert set(col.UNCERTAINTY_COLUMNS[:3]) <= set(out)
    assert np.all(out[col.ENTROPY_TOPK] >= out[col.ENTROPY_MEAN] - 1e-12)
