"""End to end through every layer: Ray Train (2 DDP workers), Ray Data scoring, a strategy, the
simulated oracle, table revisions and a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from orchestrator import ActiveLearningLoop, TableStore, config_from_dict

from .conftest import tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def finished(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[ActiveLearningLoop, list]:
    cfg = config_from_dict(tiny_config(train={"num_workers": 2}))
    loop = ActiveLearningLoop(cfg, tmp_path_factory.mktemp("e2e") / "work")
    results = [loop.step(), loop.step()]
    return loop, results


def test_labeled_set_grows_by_exactly_the_budget(finished) -> None:
    loop, results = finished
    budget = loop.config.loop.budget
    assert [r.round for r in results] == [1, 2]
    assert [r.trained_on for r in results] == [8, 8 + budget]
    assert [r.labeled_count for r in results] == [8 + budget, 8 + 2 * budget]
    assert all(len(r.added) == budget for r in results)
    assert loop.done and loop.stop_reason.startswith("rounds")
    assert loop.step() is None


def test_no_sample_is_labeled_twice_and_lineage_is_recorded(finished) -> None:
    loop, results = finished
    store = TableStore(loop.workdir / "table")
    final = store.read(results[-1].revision)
    added = results[0].added + results[1].added
    assert len(set(added)) == len(added)
    labeled = final[final.labeled]
    assert labeled.sample_id.is_unique
    initial = set(labeled.loc[labeled.round_labeled == 0, "sample_id"])
    assert len(initial) == 8 and not initial & set(added)
    for r in results:
        assert set(labeled.loc[labeled.round_labeled == r.round, "sample_id"]) == set(r.added)
    assert (final.loc[final.split == "val", "labeled"] == False).all()  # noqa: E712
    chain = store.lineage(results[-1].revision)
    assert [i.round for i in chain] == [2, 1, 0]
    assert [i.num_labeled for i in chain] == [20, 14, 8]
    # each revision carries the scores its round selected on
    assert final.loc[final.sample_id.isin(results[1].added), "entropy_mean"].notna().all()


def test_selection_follows_the_strategy(finished) -> None:
    loop, results = finished
    sel = pd.read_csv(loop.workdir / "rounds/round-002/selection.csv")
    assert sel.sample_id.tolist() == results[1].added
    scores = pd.read_parquet(loop.workdir / "rounds/round-002/scores")
    assert len(scores) == 36 + 8 and scores.sample_id.is_unique  # every image scored exactly once
    before = TableStore(loop.workdir / "table").read(results[0].revision)
    pool = set(before.loc[(before.split == "train") & ~before.labeled, "sample_id"])
    assert len(pool) == 36 - 14
    scores = scores[scores.sample_id.isin(pool)]
    top = scores.sort_values(["entropy_mean", "sample_id"], ascending=[False, True]).sample_id[:6]
    assert set(top) == set(results[1].added)
    fractions = scores.filter(like="pred_frac_").sum(axis=1)
    assert fractions.sub(1.0).abs().max() < 1e-6


def test_metrics_are_real(finished) -> None:
    loop, results = finished
    for r in results:
        assert 0.0 <= r.val_miou <= 1.0
        assert set(r.timings) == {"train", "score", "select", "label", "track"}
        per_class = [v for k, v in r.metrics.items() if k.startswith("val_iou_")]
        assert len(per_class) == 5


def test_mlflow_holds_one_parent_and_a_child_per_round(finished) -> None:
    from mlflow.tracking import MlflowClient

    loop, results = finished
    client = MlflowClient(tracking_uri=loop.tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    by_round = {int(c.data.tags["shoal.round"]): c for c in children}
    for r in results:
        child = by_round[r.round]
        assert child.data.metrics["val_miou"] == pytest.approx(r.val_miou)
        assert child.data.metrics["labeled_count"] == r.labeled_count
        assert "val_iou_leak" in child.data.metrics
        assert child.data.params["loop.strategy"] == "entropy"
        assert child.data.params["table_revision"] == r.revision
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"selection.csv", "revision.json", "quality_vs_iou.json"} <= artifacts
        assert any(k.startswith("quality_mi_") for k in child.data.metrics)
    history = client.get_metric_history(parent.info.run_id, "val_miou")
    assert sorted(m.step for m in history) == [1, 2]
    assert Path(loop.workdir / "mlflow.db").exists()


def test_rerunning_with_another_config_is_refused(finished) -> None:
    loop, _ = finished
    other = config_from_dict(tiny_config(loop={"budget": 5}))
    with pytest.raises(ValueError, match="different config"):
        ActiveLearningLoop(other, loop.workdir)


def test_review_columns_and_quality_report(finished) -> None:
    import json

    loop, results = finished
    final = TableStore(loop.workdir / "table").read(results[-1].revision)
    for col in ("quality_brightness", "quality_contrast", "quality_sharpness"):
        assert final[col].notna().all(), col  # every image, train and val, computed once
    round2_labeled = final[final.labeled & (final.round_labeled < 2)]
    assert round2_labeled["label_issue"].between(0, 1).all()
    assert final.loc[~final.labeled & (final.split == "train"), "label_issue"].isna().all()  # hidden masks never read
    report = json.loads((loop.workdir / "rounds/round-002/quality_vs_iou.json").read_text())
    assert report["images"] == 8
    assert {"quality_brightness", "quality_sharpness"} <= set(report["columns"])
