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
from workers._losses import LossSpec, choose_loss

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
    assert (loss.imbalance, loss.imbalance_threshold, loss.imbalance_loss, loss.imbalance_class_weights) == (
        LossSpec().imbalance, LossSpec().imbalance_threshold, LossSpec().imbalance_loss, LossSpec().imbalance_class_weights)


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
    assert result.extra["loss_used"].startswith("ce, class weights median (the rare-class recipe")
    assert result.extra["rare_classes"] == discovery_line(result.metrics, classes.names)
    import mlflow

    run = mlflow.MlflowClient(loop.tracking_uri).get_run(result.extra["child_run_id"])
    assert run.data.params["loss_used"] == result.extra["loss_used"]
    assert {f"val_recall_{n}" for n in classes.names} <= set(run.data.metrics)
