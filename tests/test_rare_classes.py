"""Rare classes: the training recipe switches on an imbalanced labeled set and says so, a class the
model never predicts is reported, and every round counts the labeled images of each class against
what random selection would have taken."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import workers
from orchestrator import ActiveLearningLoop, config_from_dict
from orchestrator._track import discovery_line, loss_used, never_predicted
from workers._losses import LossSpec, choose_loss, class_weights_from_counts, pixel_statistics, rare_image_factors
from workers._train import TrainSpec, _draw_weights

from .conftest import tiny_config


def test_the_recipe_switches_only_below_the_threshold_and_says_why() -> None:
    spec = LossSpec(name="ce", class_weights="none", imbalance_threshold=0.01)
    balanced = np.array([900, 100, 0])  # class 2 absent: not the rarest *present* class
    kept, info = choose_loss(spec, balanced, ("bg", "crack", "dent"))
    assert kept is spec and info["recipe"] == "configured" and info["rarest_class"] == "crack"
    rare = np.array([9950, 50, 0])
    chosen, info = choose_loss(spec, rare, ("bg", "crack", "dent"))
    assert (chosen.name, chosen.class_weights) == ("ce", "median")  # the default, from benchmarks/results/rare_recipe.md
    assert info["recipe"] == "imbalance" and info["rarest_share"] == pytest.approx(0.005)
    assert "rare-class recipe: class crack holds 0.50%" in loss_used({"loss_choice": info})
    off, info = choose_loss(LossSpec(name="ce", imbalance="off"), rare, ("bg", "crack", "dent"))
    assert off.name == "ce" and info["recipe"] == "configured"
    one_class, info = choose_loss(spec, np.array([100, 0, 0]))
    assert one_class is spec  # nothing to balance
    with pytest.raises(ValueError, match="imbalance recipe 'cee'"):
        LossSpec(imbalance_loss="cee")
    # the config's defaults are the workers' defaults
    loss = config_from_dict({}).train.loss
    assert (loss.imbalance, loss.imbalance_threshold, loss.imbalance_loss, loss.imbalance_class_weights,
            loss.imbalance_sampling) == (
        LossSpec().imbalance, LossSpec().imbalance_threshold, LossSpec().imbalance_loss, LossSpec().imbalance_class_weights,
        LossSpec().imbalance_sampling)
    with pytest.raises(ValueError, match="imbalance_sampling 'rare'"):
        LossSpec(imbalance_sampling="rare")


def test_images_holding_a_rare_class_are_drawn_more_often_capped() -> None:
    # 4 images of 100 pixels; only image 1 holds class 1 (10 pixels, 2.5%): 39x rarer than class 0
    counts = np.array([[100, 0, 0], [80, 10, 10], [90, 0, 10], [100, 0, 0]], dtype=np.float64)
    pixels = counts.sum(0)
    for cap, threshold in ((10.0, 0.03), (3.0, 0.03)):
        f = rare_image_factors(counts, pixels, threshold, cap)
        assert f.mean() == pytest.approx(1.0) and f[1] / f[0] == pytest.approx(cap)
        assert f[0] == f[2] == f[3]  # class 2 (5%) is over the threshold: its images are not favoured
    f = rare_image_factors(counts, pixels, 0.06, 100.0)  # both under it, each image by its rarest class
    assert f[1] / f[0] == pytest.approx(370 / 10) and f[2] / f[0] == pytest.approx(370 / 20)
    assert np.allclose(rare_image_factors(counts, pixels, 0.01, 10.0), 1.0)  # no class under 1%


def _spec(weights: list[float], **loss: object) -> TrainSpec:
    n = len(weights)
    return TrainSpec(model_name="unet", model_options={}, class_names=("bg", "crack"), ignore_index=255,
                     image_size=(8, 8), train_images=[f"{i}.png" for i in range(n)],
                     train_masks=[f"{i}.png" for i in range(n)], train_weights=weights, val_images=[], val_masks=[],
                     epochs=1, samples_per_epoch=4, batch_size=2, lr=1e-3, weight_decay=0.0, seed=0, output_dir="",
                     loss=LossSpec(**loss))  # type: ignore[arg-type]


def test_the_rare_class_recipe_draws_rare_images_more_and_weights_classes_as_drawn() -> None:
    counts = np.array([[1000, 0], [995, 5], [1000, 0], [1000, 0], [1000, 0]], dtype=np.float64)
    weights = [1.0, 1.0, 2.0, 1.0, 0.0]  # sample weights (an edit, a zero) are kept underneath
    loss, info, class_weights, draw, pixels = _draw_weights(_spec(weights), counts)
    assert info["recipe"] == "imbalance" and info["sampling"] == "rare_images" and info["rare_images"] == 1
    assert draw[4] == 0 and draw[1] / draw[0] == pytest.approx(10.0) and draw[2] / draw[0] == pytest.approx(2.0)
    assert info["rare_draw_share_before"] == pytest.approx(1 / 5) and info["rare_draw_share"] == pytest.approx(10 / 14)
    assert np.allclose(pixels, [4995, 5])  # the labeled set by sample weight, not as drawn
    assert np.allclose(draw, np.asarray(weights) * rare_image_factors(counts, pixels, 0.01, 10.0))
    drawn_pixels, drawn_image_pixels = pixel_statistics(counts, draw)
    assert np.allclose(class_weights, class_weights_from_counts(drawn_pixels, drawn_image_pixels, "median", 10.0))
    assert "its 1 image drawn 71% of the time (by sample weight 20%)" in loss_used({"loss_choice": info})
    # switched off, or a balanced set: drawn by sample weight only
    _, info, _, draw, _ = _draw_weights(_spec(weights, imbalance_sampling="none"), counts)
    assert info["recipe"] == "imbalance" and "sampling" not in info and draw.tolist() == weights
    balanced = np.array([[600, 400], [500, 500]], dtype=np.float64)
    _, info, _, draw, _ = _draw_weights(_spec([1.0, 1.0]), balanced)
    assert info["recipe"] == "configured" and draw.tolist() == [1.0, 1.0]


def test_a_class_in_validation_never_predicted_is_named() -> None:
    # rows truth, columns prediction: class 2 is in the masks, nothing is predicted as 2
    cm = [[50, 3, 0], [4, 10, 0], [6, 1, 0]]
    assert never_predicted({"val_confusion": cm}, ("bg", "crack", "dent")) == ["dent"]
    cm[2][2] = 1
    assert never_predicted({"val_confusion": cm}, ("bg", "crack", "dent")) == []
    # a class absent from the validation masks is not "never predicted"
    assert never_predicted({"val_confusion": [[5, 0], [0, 0]]}, ("bg", "crack")) == []


def test_discovery_line_names_the_rarest_classes_against_random() -> None:
    metrics = {"labeled_images_bg": 10.0, "random_images_bg": 10.0, "labeled_images_crack": 6.0,
               "random_images_crack": 1.5, "labeled_images_dent": 2.0, "random_images_dent": 3.0}
    line = discovery_line(metrics, ("bg", "crack", "dent"))
    assert line == "crack in 6 labeled images (random: 1.5), dent in 2 labeled images (random: 3.0)"
    assert discovery_line({"labeled_images_bg": 3.0}, ("bg",)) == ""  # no ground truth: no claim


def test_a_round_counts_each_class_against_the_pool_rate_and_logs_the_recipe(
    tmp_path: Path, ray_cluster: None
) -> None:
    cfg = config_from_dict(tiny_config(loop={"rounds": 1, "strategy": "random"},
                                       train={"loss": {"imbalance_threshold": 0.5}}))
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    [result] = loop.run()
    table = loop.store.read(result.revision)
    classes = loop.ctx.classes()
    pool = table[table.split == "train"]
    truth = workers.count_class_pixels(pool.mask_path.astype(str).tolist(), classes) > 0  # counted here, by hand
    stats = json.loads((loop.workdir / "pool_classes.json").read_text())
    assert stats["num_images"] == len(pool) and stats["images"] == truth.sum(0).tolist()
    labeled = pool.labeled.to_numpy()
    for c, name in enumerate(classes.names):
        assert result.metrics[f"labeled_images_{name}"] == truth[labeled, c].sum()
        assert result.metrics[f"random_images_{name}"] == pytest.approx(labeled.sum() * truth[:, c].mean())
    # the threshold of 0.5 makes any two-class set imbalanced: the recipe is used, logged and printed
    assert result.extra["loss_used"].startswith("ce, class weights median, its ")
    assert "drawn" in result.extra["loss_used"] and "(the rare-class recipe" in result.extra["loss_used"]
    assert result.extra["rare_classes"] == discovery_line(result.metrics, classes.names)
    import mlflow

    run = mlflow.MlflowClient(loop.tracking_uri).get_run(result.extra["child_run_id"])
    assert run.data.params["loss_used"] == result.extra["loss_used"]
    assert {f"val_recall_{n}" for n in classes.names} <= set(run.data.metrics)
