"""MLflow tracking: the figures and numbers of a round, the Tracker on a local store, and an
experiment logged to a real ``mlflow server`` on loopback (from the driver and from a Ray task),
read back through ``MlflowClient``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator import ActiveLearningLoop, config_from_dict
from orchestrator._report import dice_per_class, learning_curve
from workers import Tracker, learning_curve_auc
from workers._data import ClassInfo
from workers._figures import (
    count_class_pixels,
    plot_class_distribution,
    plot_confusion_matrix,
    plot_learning_curve,
    plot_thumbnails,
    plot_weights_histogram,
)

from .conftest import stop_group, tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ numbers and figures


def test_learning_curve_auc_is_the_mean_miou_over_the_labeled_range() -> None:
    assert learning_curve_auc([10, 20, 30], [0.2, 0.4, 0.4]) == pytest.approx((0.3 * 10 + 0.4 * 10) / 20)
    assert learning_curve_auc([30, 10, 20], [0.4, 0.2, 0.4]) == pytest.approx(0.35)  # order does not matter
    assert learning_curve_auc([8, 16], [0.5, 0.5]) == pytest.approx(0.5)
    assert learning_curve_auc([8], [0.3]) == pytest.approx(0.3)
    assert learning_curve_auc([8, 16], [0.3, float("nan")]) == pytest.approx(0.3)
    assert np.isnan(learning_curve_auc([], []))
    with pytest.raises(ValueError, match="differ in length"):
        learning_curve_auc([1, 2], [0.1])


def test_dice_comes_from_the_worker_or_from_the_confusion_matrix() -> None:
    assert dice_per_class({"val_dice_per_class": [0.5, 0.25]}, 2) == [0.5, 0.25]
    cm = [[8, 2], [0, 0]]  # class 0: TP 8, FN 2; class 1: FP 2, never true
    dice = dice_per_class({"val_confusion": cm}, 2)
    assert dice[0] == pytest.approx(2 * 8 / (2 * 8 + 2)) and dice[1] == 0.0
    assert np.isnan(dice_per_class({"val_confusion": [[0, 0], [0, 4]]}, 2)[0])  # in neither truth nor prediction
    assert all(np.isnan(dice_per_class({}, 2)))


def test_learning_curve_rows_come_from_the_history_and_the_current_round() -> None:
    history = [{"round": 1, "trained_on": 8, "labeled_count": 14, "metrics": {"val_miou": 0.2}}]
    curve = learning_curve(history, (2, 14, 0.3, 20))
    assert curve.to_dict("list") == {"round": [1, 2], "trained_on": [8, 14], "val_miou": [0.2, 0.3],
                                     "labeled_count": [14, 20]}
    # a round tracked again after a crash is not counted twice
    assert len(learning_curve([*history, {**history[0], "round": 2}], (2, 14, 0.3, 20))) == 2


def test_figures_are_pngs(tmp_path: Path) -> None:
    names = ["sea", "pipe", "leak"]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    masks = [rng.integers(0, 3, (12, 16)) for _ in range(3)]
    paths = [
        plot_learning_curve(tmp_path / "curve.png", {"entropy": ([8, 14], [0.2, 0.3]), "random baseline": ([8, 14], [0.2, 0.25])}),
        plot_confusion_matrix(tmp_path / "cm.png", [[5, 1, 0], [2, 3, 0], [0, 0, 0]], names),
        plot_class_distribution(tmp_path / "dist.png", [100, 20, 0], names, images_per_class=[3, 2, 0]),
        plot_weights_histogram(tmp_path / "w.png", [1.0, 1.0, 1.0]),
        plot_weights_histogram(tmp_path / "w2.png", [0.0, 0.5, 2.0]),
        plot_thumbnails(tmp_path / "thumbs.png", images, masks, names, labels=[masks[0], None, masks[2]],
                        sam_masks=[None, None, masks[1]], captions=["a", "b", "c"]),
        plot_thumbnails(tmp_path / "none.png", [], [], names),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 1000
    jpeg = plot_thumbnails(tmp_path / "thumbs.jpg", images, masks, names)
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, for photographs
    with pytest.raises(ValueError, match="3 classes"):
        plot_confusion_matrix(tmp_path / "bad.png", [[1, 0], [0, 1]], names)
    with pytest.raises(ValueError, match="1 SAM masks for 3 images"):
        plot_thumbnails(tmp_path / "bad.png", images, masks, names, sam_masks=[None])


def test_class_pixels_are_counted_at_the_mask_resolution(tmp_path: Path) -> None:
    import cv2

    mask = np.full((4, 6), 255, np.uint8)
    mask[:2] = 0
    mask[2, :3] = 2
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    counts = count_class_pixels([str(tmp_path / "m.png")] * 2, ClassInfo(names=("a", "b", "c"), ignore_index=255))
    assert counts.tolist() == [[12, 0, 3], [12, 0, 3]]


# ------------------------------------------------------------------------------ Tracker, local store


def test_tracker_finds_runs_again_and_reads_curves(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", artifact_location=(tmp_path / "art").as_uri())
    again = Tracker(uri, "exp")
    assert again.experiment_id == tracker.experiment_id
    parent = tracker.parent_run("uid-1", "run", tags={"shoal.strategy": "random", "shoal.dataset": "d'x"})
    assert tracker.parent_run("uid-1", "run") == parent
    child = tracker.round_run("uid-1", parent, 1)
    assert tracker.round_run("uid-1", parent, 1) == child
    for step, (n, miou) in enumerate([(8, 0.1), (14, 0.3)], start=1):
        tracker.log(parent, metrics={"trained_on": n, "val_miou": miou}, step=step)
    other = tracker.parent_run("uid-2", "run", tags={"shoal.strategy": "entropy", "shoal.dataset": "d'x"})
    # a value with a quote is matched exactly
    assert tracker.experiment_runs({"shoal.strategy": "random", "shoal.dataset": "d'x"}) == [parent]
    assert tracker.experiment_runs({"shoal.strategy": "random", "shoal.dataset": "d'x"}, exclude=[parent]) == []
    assert tracker.experiment_runs({"shoal.dataset": "d'x"}) == [other, parent]  # newest first
    assert tracker.curve(parent, "trained_on", "val_miou") == ([8.0, 14.0], [0.1, 0.3])
    tracker.log(child, params={"a": 1})
    tracker.log(child, params={"a": 1}, metrics={"nan": float("nan")})  # resumed: same value, NaN skipped


# ------------------------------------------------------------------------------ a real mlflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 in its own process group, stopped with the group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.read().strip() == b"OK":
                    break
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, timeout=20)
        log.close()


def _log_from_ray_task(url: str, experiment: str) -> str:
    import ray

    @ray.remote(num_cpus=0)
    def log_run(url: str, experiment: str) -> tuple[str, str]:
        from workers import Tracker

        tracker = Tracker(url, experiment)
        run = tracker.parent_run("from-a-ray-task", "ray-task")
        tracker.log(run, metrics={"answer": 42.0})
        tracker.finish(run)
        return run, tracker.experiment_id

    run_id, experiment_id = ray.get(log_run.remote(url, experiment))
    return f"{experiment_id}/{run_id}"


@pytest.fixture(scope="module")
def served(ray_cluster: None, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    url = mlflow_server
    cfg = config_from_dict(tiny_config(tracking={"tracking_uri": url, "experiment_name": "served"}))
    # A random baseline on the same data, logged earlier: the entropy run's curve is drawn beside it.
    tracker = Tracker(url, "served")
    from orchestrator._report import experiment_tags

    baseline = tracker.parent_run("baseline-uid", "random baseline",
                                  tags={**experiment_tags(cfg), "shoal.strategy": "random"})
    for step, (n, miou) in enumerate([(8, 0.05), (14, 0.1)], start=1):
        tracker.log(baseline, metrics={"trained_on": n, "val_miou": miou}, step=step)
    tracker.finish(baseline)
    loop = ActiveLearningLoop(cfg, tmp_path_factory.mktemp("served") / "work")
    results = loop.run()
    from_ray = _log_from_ray_task(url, "served")
    return url, loop, results, baseline, from_ray


@pytest.mark.ray
def test_runs_logged_from_the_driver_and_from_ray_land_in_one_experiment(served) -> None:
    from mlflow.tracking import MlflowClient

    url, loop, results, baseline, from_ray = served
    assert not (loop.workdir / "mlflow.db").exists()  # nothing went to the local default store
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("served")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags.get("shoal.run_kind", "") for r in runs)
    assert kinds == ["experiment", "experiment", "experiment", "round", "round"]  # run, baseline, Ray task
    experiment_id, run_id = from_ray.split("/")
    assert experiment_id == exp.experiment_id
    assert client.get_run(run_id).data.metrics["answer"] == 42.0


@pytest.mark.ray
def test_each_round_run_holds_params_metrics_tags_and_artifacts(served, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    url, loop, results, baseline, _ = served
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("served")
    parent_id = loop.state.parent_run_id
    children = {int(r.data.tags["shoal.round"]): r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert sorted(children) == [1, 2]
    names = loop.ctx.classes().names
    for r in results:
        run = children[r.round]
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        assert {k: params[k] for k in ("strategy", "budget", "model", "loss", "seed")} == {
            "strategy": "entropy", "budget": "6", "model": "unet", "loss": "ce", "seed": "0"}
        assert params["dataset_revision"] == r.revision == params["table_revision"]
        assert metrics["val_miou"] == pytest.approx(r.val_miou)
        assert metrics["labeled_count"] == r.labeled_count
        for name in names:
            assert f"val_iou_{name}" in metrics and f"val_dice_{name}" in metrics
        pixels = sum(metrics[f"labeled_pixels_{name}"] for name in names)
        assert pixels == r.labeled_count * 32 * 48  # every labeled pixel of the 32x48 masks, once
        assert {"train_seconds", "score_seconds", "select_seconds"} <= set(metrics)
        assert tags["shoal.strategy"] == "entropy" and tags["shoal.dataset"].startswith("synthetic:")
        assert tags["shoal.git_commit"] and tags["shoal.version"] == "0.1.0"
        assert tags["shoal.baseline_run_id"] == baseline
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert artifacts == {f"figures/{n}.png" for n in (
            "learning_curve", "confusion_matrix", "class_distribution", "weights_histogram")} | {
            "figures/selected_thumbnails.jpg"}
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / str(r.round))))
        selection = pd.read_csv(local / "selection.csv")
        assert selection.sample_id.tolist() == r.added
        assert selection.reason.str.contains("entropy").all() and "entropy_mean" in selection
        revision = json.loads((local / "revision.json").read_text())
        assert revision["revision"] == r.revision and revision["parent"] == revision["lineage"][1]["id"]
        dist = pd.read_csv(local / "tables/class_distribution.csv")
        assert dist["class"].tolist() == list(names) and dist.pixels.sum() == pixels
        assert (local / "figures/learning_curve.png").read_bytes()[:8] == PNG


@pytest.mark.ray
def test_the_parent_run_holds_the_summary_and_a_loadable_model(served, tmp_path: Path) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    url, loop, results, _, _ = served
    client = MlflowClient(tracking_uri=url)
    parent = client.get_run(loop.state.parent_run_id)
    assert parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    assert metrics["final_val_miou"] == pytest.approx(results[-1].val_miou)
    auc = learning_curve_auc([r.trained_on for r in results], [r.val_miou for r in results])
    assert metrics["final_learning_curve_auc"] == pytest.approx(auc)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"learning_curve.png", "learning_curve.csv"}
    models = client.search_logged_models([parent.info.experiment_id])
    assert [m.source_run_id for m in models] == [parent.info.run_id]
    assert parent.data.tags["shoal.model_uri"] == models[0].model_uri
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)
    try:
        model = mlflow.pytorch.load_model(models[0].model_uri, dst_path=str(tmp_path))
    finally:
        mlflow.set_tracking_uri(previous)
    assert model(torch.zeros(3, 3, 32, 48)).shape == (3, 5, 32, 48)  # batch size is not fixed
