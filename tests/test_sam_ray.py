"""SAM in the loop on a real local Ray cluster: decoder fine-tuning, the SAM scoring pass over the
pool with the embedding cache, and SAM-refined pre-annotations for people (tiny SAM)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import workers
from orchestrator import ActiveLearningLoop, config_from_dict
from strategies import columns as col
from tests.conftest import tiny_config
from tests.test_sam import tiny_checkpoint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def paused(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> ActiveLearningLoop:
    root = tmp_path_factory.mktemp("sam")
    cfg = config_from_dict(tiny_config(
        oracle={"kind": "folder"},
        loop={"strategy": "fusion", "strategy_options": {"members": {"entropy": 0.5, "sam_disagreement": 0.5}}},
        sam={"enabled": True, "model_type": "tiny", "checkpoint": tiny_checkpoint(root / "tiny.pt"),
             "prompts": {"skip_classes": [0], "min_area_px": 4}, "finetune": {"enabled": True, "steps": 3}},
    ))
    loop = ActiveLearningLoop(cfg, root / "work")
    assert loop.step() is None  # trains, tunes SAM's decoder, scores with SAM, selects, exports, waits
    return loop


def test_round_scores_the_pool_with_sam_and_a_tuned_decoder(paused: ActiveLearningLoop) -> None:
    assert paused.state is not None
    info = paused.state.round_info["score"]
    tuned = info["sam_finetune"]
    assert Path(info["sam_decoder"]).is_file() and tuned["steps"] == 3 and tuned["holdout_images"] >= 1
    assert tuned["images_encoded"] == 8  # the initial labeled set, embedded once and cached
    assert info["sam_images_encoded"] == 36 - 8  # the pool, cold
    scores = pd.read_parquet(info["scores_dir"])
    table = paused.store.read(paused.state.revision)
    pool = set(table.loc[(table.split == "train") & ~table.labeled, "sample_id"])
    in_pool = scores.sample_id.isin(pool)
    assert in_pool.sum() == 28 and (scores.loc[in_pool, col.SAM_EMBEDDING_CACHED] == 0).all()
    assert scores.loc[~in_pool, col.SAM_COMPONENTS].isna().all()  # reviewed labeled and val rows: no SAM
    prompted = scores.loc[in_pool, col.SAM_COMPONENTS] > 0
    assert prompted.any()
    assert scores.loc[in_pool][prompted][col.SAM_DISAGREEMENT_MEAN].between(0, 1).all()
    assert {col.sam_class_column(c) for c in range(5)} <= set(scores.columns)
    selection = pd.read_csv(paused.workdir / "rounds/round-001/selection.csv")
    assert col.SAM_DISAGREEMENT_MEAN in selection.columns and len(selection) == 6


def test_preannotations_are_sam_refined_class_id_pngs(paused: ActiveLearningLoop) -> None:
    round_dir = paused.workdir / "rounds/round-001"
    manifest = json.loads((round_dir / "tasks/manifest.json").read_text())
    assert len(manifest["samples"]) == 6
    for s in manifest["samples"]:
        beside = cv2.imread(str(round_dir / "sam_preannotations" / f"{s['name']}.png"), cv2.IMREAD_UNCHANGED)
        task = cv2.imread(str(round_dir / "tasks" / s["preannotation"]), cv2.IMREAD_UNCHANGED)
        assert beside.shape == (s["height"], s["width"]) and np.array_equal(beside, task)
        assert beside.dtype == np.uint8 and beside.max() < 5


def test_a_later_pass_hits_the_cache_and_a_changed_image_misses(paused: ActiveLearningLoop, tmp_path: Path) -> None:
    assert paused.state is not None
    cfg, round_dir = paused.config, paused.workdir / "rounds/round-001"
    sam = workers.SamSpec.from_config(asdict(cfg.sam), str(paused.workdir / "sam_cache"))
    pool = pd.read_parquet(round_dir / "pool.parquet")
    edited = pool.loc[pool[workers.POOL_FLAG]].iloc[0]
    image = cv2.imread(edited.image_path)
    cv2.imwrite(edited.image_path, 255 - image)  # edited in place: new content, new key
    # A later round's pass: only the prompt encoder and the mask decoder run, except for that image.
    result = workers.score_pool_pass(
        str(round_dir / "pool.parquet"), paused.state.round_info["train"]["checkpoint_path"], cfg.data.image_size,
        str(tmp_path / "scores"), workers.PassSpec(sam=sam, sam_checkpoint_id=sam.checkpoint_id()),
        num_actors=1, batch_size=8, cpus_per_actor=1.0)
    assert result.num_scored == 36 + 8 and result.sam_images_encoded == 1
    scores = pd.read_parquet(result.scores_dir).set_index("sample_id")[col.SAM_EMBEDDING_CACHED]
    assert scores[edited.sample_id] == 0.0 and (scores.drop(edited.sample_id).dropna() == 1.0).all()


def test_decoder_holdout_iou_reaches_the_round_run(paused: ActiveLearningLoop, tmp_path: Path) -> None:
    """Runs last: imports the labels the round waits for, so its track phase logs to MLflow."""
    from mlflow.tracking import MlflowClient

    assert paused.state is not None and paused.awaiting_labels is not None
    tuned = dict(paused.state.round_info["score"]["sam_finetune"])
    assert tuned["val_iou_before"] != tuned["val_iou_after"]  # else swapped or repeated keys would pass
    table = paused.store.read(paused.state.revision).set_index("sample_id")
    manifest = json.loads((Path(paused.awaiting_labels["task_dir"]) / "manifest.json").read_text())
    (tmp_path / "masks").mkdir()
    for s in manifest["samples"]:
        truth = cv2.imread(str(table.loc[s["sample_id"], "mask_path"]), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(tmp_path / "masks" / f"{s['name']}.png"), truth)
    paused.import_labels(tmp_path)
    result = paused.step()
    assert result is not None and result.round == 1
    run = MlflowClient(paused.tracking_uri).get_run(result.extra["child_run_id"])
    assert run.data.metrics["sam_decoder_holdout_iou_before"] == pytest.approx(tuned["val_iou_before"], abs=1e-12)
    assert run.data.metrics["sam_decoder_holdout_iou_after"] == pytest.approx(tuned["val_iou_after"], abs=1e-12)
    assert run.data.metrics["sam_decoder_finetune_seconds"] == pytest.approx(tuned["seconds"], abs=1e-9)
    assert run.data.params["sam_decoder_finetune_steps"] == "3" == str(tuned["steps"])
    assert run.data.params["sam_decoder_holdout_images"] == str(tuned["holdout_images"])
    assert result.metrics["sam_decoder_holdout_iou_after"] == tuned["val_iou_after"]
    parent = MlflowClient(paused.tracking_uri).get_metric_history(paused.state.parent_run_id,
                                                                 "sam_decoder_holdout_iou_after")
    assert [(m.step, m.value) for m in parent] == [(1, pytest.approx(tuned["val_iou_after"]))]
    uploaded = [a.path for a in MlflowClient(paused.tracking_uri).list_artifacts(run.info.run_id, "tables")]
    assert "tables/sam_decoder.csv" in uploaded
    report = pd.read_csv(paused.workdir / "rounds/round-001/report/sam_decoder.csv")
    assert report.loc[0, "holdout_iou_before"] == pytest.approx(tuned["val_iou_before"])
    assert report.loc[0, "holdout_iou_after"] == pytest.approx(tuned["val_iou_after"])
