"""People label regions (``loop.unit: region`` with ``oracle.kind: folder``): the round exports its
queue as a region task folder and waits; imported answers count inside the asked regions only, are
charged by the cost model and grow partial masks; a region left empty stays in the pool."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import strategies
import workers
from orchestrator import ActiveLearningLoop, TableStore, _faults, config_from_dict
from orchestrator import _region_unit as regions
from orchestrator._labeling import export_folder_tasks
from orchestrator._labelstudio import label_studio_spec

from .conftest import tiny_config

pytestmark = pytest.mark.ray

IGNORE = 255
COST = {"purity_threshold": 0.75, "clicks_per_vertex": 0.0, "clicks_per_object": 0.5}
REGION = {
    "loop": {"unit": "region", "strategy": "region_random", "rounds": 1},
    "regions": {"method": "grid", "cell_px": 8, "budget_clicks": 30.0},
    # Mixed cells (a quarter of them at 0.75) cost a click plus half a click per polygon.
    "cost": COST,
    "oracle": {"kind": "folder"},
}
CLASSES = workers.ClassInfo(names=workers.SYNTHETIC_CLASSES.names, ignore_index=IGNORE)


@pytest.fixture(scope="module")
def paused(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> ActiveLearningLoop:
    loop = ActiveLearningLoop(config_from_dict(tiny_config(**REGION)), tmp_path_factory.mktemp("regions") / "work")
    assert loop.step() is None  # round 1 trains, scores, queues regions, exports them, then waits
    return loop


def manifest(loop: ActiveLearningLoop) -> dict:
    return json.loads((Path(loop.awaiting_labels["task_dir"]) / "manifest.json").read_text())


def row(loop: ActiveLearningLoop, sample_id: str) -> pd.Series:
    return loop.store.read(loop.state.revision).set_index("sample_id").loc[sample_id]


def truth(loop: ActiveLearningLoop, sample_id: str) -> np.ndarray:
    return workers.load_mask(str(row(loop, sample_id)["truth_path"]), CLASSES)


def cache_map(loop: ActiveLearningLoop, sample_id: str) -> np.ndarray:
    cache = workers.RegionCache(loop.workdir / "region_cache", workers.RegionSpec((32, 48), method="grid", cell_px=8))
    found = cache.get(workers.file_digest(str(row(loop, sample_id)["image_path"])))
    assert found is not None
    return found


def queue(loop: ActiveLearningLoop) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for sid, rid in loop.state.round_info["select"]["regions"]:
        out.setdefault(sid, []).append(rid)
    return out


def blanked(loop: ActiveLearningLoop) -> tuple[str, int]:
    """The (image, region) every answer leaves unlabeled: the first image with two asked regions,
    its second asked region."""
    sid = next(s for s, ids in queue(loop).items() if len(ids) >= 2)
    return sid, queue(loop)[sid][1]


def write_answers(loop: ActiveLearningLoop, folder: Path, ids: list[str]) -> None:
    """The truth painted over the whole image (outside the asked regions too), except the blanked region."""
    names = {s["sample_id"]: s["name"] for s in manifest(loop)["samples"]}
    skip_sid, skip_rid = blanked(loop)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for sid in ids:
        answer = truth(loop, sid).astype(np.uint8)
        if sid == skip_sid:
            answer[workers.resize_regions(cache_map(loop, sid), answer.shape) == skip_rid] = IGNORE
        cv2.imwrite(str(folder / "masks" / f"{names[sid]}.png"), answer)


def snapshot(workdir: Path) -> tuple[list[str], str, list[str], bool]:
    labels = sorted(str(p) for p in (workdir / "labels").rglob("*")) if (workdir / "labels").exists() else []
    return (TableStore(workdir / "table").revisions(), (workdir / "state.json").read_text(), labels,
            (workdir / "rounds" / "round-001" / "labeled_regions.parquet").exists())


def test_the_round_exports_its_queue_as_a_region_task(paused: ActiveLearningLoop) -> None:
    request = paused.awaiting_labels
    select = paused.state.round_info["select"]
    assert request is not None and request["requested"] == select["selected"] and not request["received"]
    task = Path(request["task_dir"])
    assert task == paused.workdir / "rounds" / "round-001" / "tasks"
    found = manifest(paused)
    assert found["kind"] == "region" and "todo" in found["instructions"]
    assert [s["sample_id"] for s in found["samples"]] == select["selected"]
    asked = queue(paused)
    assert sum(len(ids) for ids in asked.values()) == len(select["regions"]) > len(asked)  # the whole queue
    outside = 0
    for s in found["samples"]:
        assert s["regions"] == asked[s["sample_id"]]  # in rank order
        assert (task / s["image"]).is_file()
        region_map = cv2.imread(str(task / s["region_map"]), cv2.IMREAD_UNCHANGED)
        assert region_map.dtype == np.uint16 and region_map.shape == (s["height"], s["width"])
        np.testing.assert_array_equal(region_map, cache_map(paused, s["sample_id"]))
        todo = cv2.imread(str(task / s["todo"]), cv2.IMREAD_UNCHANGED)
        assert todo.dtype == np.uint8 and set(np.unique(todo)) <= {0, 255}
        np.testing.assert_array_equal(todo == 255, np.isin(region_map, s["regions"]))
        # the model's pre-annotation, inside the asked regions only
        pre = cv2.imread(str(task / s["preannotation"]), cv2.IMREAD_UNCHANGED)
        assert (pre[todo == 255] < 5).all() and (pre[todo == 0] == IGNORE).all()
        outside += int((todo == 0).sum())
    assert outside > 0
    assert paused.step() is None  # nothing imported yet: still waiting


def test_bad_answers_name_the_file_and_import_nothing(paused: ActiveLearningLoop, tmp_path: Path) -> None:
    ids = paused.awaiting_labels["requested"]
    name = manifest(paused)["samples"][0]["name"]
    gt = truth(paused, ids[0]).astype(np.uint8)
    before = snapshot(paused.workdir)
    for tag, bad, message in (("size", gt[:-2], "does not match its image"),
                              ("ids", np.full_like(gt, 7), "invalid class id")):
        folder = tmp_path / tag
        write_answers(paused, folder, ids[1:3])  # two good files next to the bad one
        cv2.imwrite(str(folder / "masks" / f"{name}.png"), bad)
        with pytest.raises(ValueError, match=message) as err:
            paused.import_labels(folder)
        assert str(folder / "masks" / f"{name}.png") in str(err.value)
        assert snapshot(paused.workdir) == before, tag
    assert not paused.awaiting_labels["received"]


def expected_labels(loop: ActiveLearningLoop, sid: str) -> tuple[np.ndarray, list[int], pd.DataFrame]:
    """(the partial mask, the labeled region ids, the cost model's rows) an answer from
    :func:`write_answers` should give ``sid``: its truth inside the answered asked regions."""
    gt = truth(loop, sid)
    region_map = workers.resize_regions(cache_map(loop, sid), gt.shape)
    skip_sid, skip_rid = blanked(loop)
    ids = [r for r in queue(loop)[sid] if not (sid == skip_sid and r == skip_rid)
           and (gt[region_map == r] != IGNORE).any()]
    answer = np.where(np.isin(region_map, ids), gt, IGNORE)
    rows = workers.label_regions(answer, region_map, ids, ignore_index=IGNORE,
                                 cost=strategies.CostModel(**COST)).rows
    return answer, ids, rows


class Killed(Exception):
    """Stands for a SIGKILL at a fault checkpoint: the state is not saved."""


def test_answers_count_inside_the_asked_regions_and_reimports_change_nothing(
    paused: ActiveLearningLoop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = paused.awaiting_labels["requested"]
    skip_sid, skip_rid = blanked(paused)
    first_ids = sorted({*ids[: len(ids) // 2], skip_sid})
    first = tmp_path / "batch1"
    write_answers(paused, first, first_ids)
    report = paused.import_labels(first)
    assert sorted(report["added"]) == first_ids and report["unchanged"] == 0
    records = pd.read_parquet(paused.workdir / "rounds" / "round-001" / "labeled_regions.parquet")
    table = paused.store.read(report["revision"]).set_index("sample_id")
    names = {s["sample_id"]: s["name"] for s in manifest(paused)["samples"]}
    expected_pairs, expected_clicks = set(), 0.0
    for sid in first_ids:
        answer, labeled, rows = expected_labels(paused, sid)
        mine = records[records.sample_id == sid].set_index("region_id").loc[labeled]
        # clicks, purity and dominant class: the cost model's on the answer, region by region
        np.testing.assert_allclose(mine.clicks.to_numpy(), rows.clicks.to_numpy())
        np.testing.assert_array_equal(mine.mixed.to_numpy(), rows.mixed.to_numpy())
        np.testing.assert_array_equal(mine.label_class.to_numpy(), rows.label_class.to_numpy())
        # the answered pixels themselves, and nothing painted outside the asked regions
        mask = workers.load_mask(str(table.loc[sid, "mask_path"]), CLASSES)
        np.testing.assert_array_equal(mask, answer)
        assert re.fullmatch(rf"{re.escape(names[sid])}-[0-9a-f]{{16}}\.png", Path(table.loc[sid, "mask_path"]).name)
        assert Path(table.loc[sid, "mask_path"]).parent == paused.workdir / "labels" / "partial" / "round-001"
        r = table.loc[sid]
        assert r.labeled and r.partial and r.round_labeled == 1 and r.weight == 1.0
        assert r.labeled_pixels == (mask != IGNORE).sum() and r.regions_labeled == len(labeled)
        assert r.clicks == pytest.approx(rows.clicks.sum())
        expected_pairs |= {(sid, rid) for rid in labeled}
        expected_clicks += float(rows.clicks.sum())
    assert set(zip(records.sample_id, records.region_id)) == expected_pairs and len(records) == len(expected_pairs)
    assert (skip_sid, skip_rid) not in expected_pairs
    assert records.mixed.any() and (records.clicks > 1).any()  # some region cost more than its click
    assert report["regions"] == len(records) and report["clicks"] == pytest.approx(expected_clicks)

    before = snapshot(paused.workdir)
    again = paused.import_labels(first)  # the same answers twice: nothing changes
    assert again["added"] == [] and again["unchanged"] == len(first_ids) and again["regions"] == 0
    assert snapshot(paused.workdir) == before

    # A fresh process sees the partial import; a later import adds the rest, the blanked region
    # still empty, and leaves the first batch's regions as they were. The first try is killed after
    # its revision (and labeled regions) were written, before the state recorded them: the retry
    # reuses that revision and writes no region twice.
    reopened = ActiveLearningLoop.resume(paused.workdir)
    assert sorted(reopened.awaiting_labels["received"]) == first_ids
    second = tmp_path / "batch2"
    write_answers(reopened, second, ids)
    revisions = reopened.store.revisions()

    def kill(name: str) -> None:
        if name == "import:after":
            raise Killed(name)

    monkeypatch.setattr(_faults, "checkpoint", kill)
    with pytest.raises(Killed):
        reopened.import_labels(second)
    monkeypatch.setattr(_faults, "checkpoint", lambda name: None)
    reopened = ActiveLearningLoop.resume(paused.workdir)
    assert sorted(reopened.awaiting_labels["received"]) == first_ids
    report = reopened.import_labels(second)
    assert reopened.store.revisions() == [*revisions, report["revision"]]
    assert sorted(report["added"]) == sorted(set(ids) - set(first_ids))
    assert report["unchanged"] == len(first_ids)
    records = pd.read_parquet(paused.workdir / "rounds" / "round-001" / "labeled_regions.parquet")
    assert not records.duplicated(["sample_id", "region_id"]).any()
    assert (skip_sid, skip_rid) not in set(zip(records.sample_id, records.region_id))
    assert len(records) == len(paused.state.round_info["select"]["regions"]) - 1  # every region but the blanked one
    chain = [i.comment for i in reopened.store.lineage(report["revision"])]
    assert chain[0].startswith("import region labels: +") and chain[1].startswith("import region labels: +")
    paused.state = reopened.state  # the next test finishes the round


def test_the_round_finishes_with_what_came_back(paused: ActiveLearningLoop) -> None:
    from mlflow.tracking import MlflowClient

    select = paused.state.round_info["select"]
    received = paused.awaiting_labels["received"]
    result = paused.step()
    assert result is not None and result.round == 1 and paused.done
    records = pd.read_parquet(paused.workdir / "rounds" / "round-001" / "labeled_regions.parquet")
    assert result.added == select["selected"]  # every image got some region
    assert sum(map(len, received.values())) == len(records)
    assert result.metrics["round_clicks"] == pytest.approx(records.clicks.sum())
    assert result.metrics["labeled_regions"] == len(records)
    table = paused.store.read(result.revision)
    first = paused.store.read(paused.store.lineage(result.revision)[-1].id)
    initial = first.loc[first.labeled, "clicks"].sum()
    assert table.loc[table.labeled, "clicks"].sum() == pytest.approx(initial + records.clicks.sum())

    client = MlflowClient(tracking_uri=paused.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [c.info.run_id for c in children] == [result.extra["child_run_id"]]
    assert children[0].data.tags["shoal.round"] == "1"
    assert children[0].data.metrics["round_clicks"] == pytest.approx(records.clicks.sum())

    # The blanked region is not labeled: its pixels hold the ignore index and the next round's
    # region table (round 1's scores, labeled flags as round 2 sees them) offers it again.
    skip_sid, skip_rid = blanked_from(records, select)
    row = table.set_index("sample_id").loc[skip_sid]
    mask = workers.load_mask(str(row.mask_path), CLASSES)
    region_map = workers.resize_regions(cache_map(paused, skip_sid), mask.shape)
    assert (mask[region_map == skip_rid] == IGNORE).all() and (mask != IGNORE).any()
    assert regions.RegionUnit(paused.config).open_pool(table)[table.sample_id == skip_sid].all()
    offered = regions.region_table(paused.workdir, 2, str(paused.workdir / "rounds" / "round-001" / "region_scores"))
    flags = offered.set_index(["sample_id", "region_id"])["labeled"]
    assert not flags[(skip_sid, skip_rid)]
    assert flags[[(s, int(r)) for s, r in zip(records.sample_id, records.region_id)]].all()


def blanked_from(records: pd.DataFrame, select: dict) -> tuple[str, int]:
    """The one queued region the imports left out."""
    done = set(zip(records.sample_id, records.region_id.astype(int)))
    [left] = [(str(s), int(r)) for s, r in select["regions"] if (str(s), int(r)) not in done]
    return left


def test_region_task_export_enlarges_maps_and_restricts_label_studio_predictions(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    table = pd.DataFrame({"sample_id": ["a b"], "image_path": [str(tmp_path / "a.png")]})
    small = np.arange(6, dtype=np.int32).reshape(2, 3)  # 2 x 3 cells, enlarged to 10 x 10 pixels each
    pre = np.full((20, 30), 2, dtype=np.uint8)
    spec = label_studio_spec(CLASSES.names, None, tmp_path, None, None)
    export = export_folder_tasks(table, ["a b"], tmp_path / "tasks", CLASSES, round_index=3, kind="region",
                                 preannotations={"a b": pre}, label_studio=spec, regions={"a b": (small, [4, 1])})
    task = Path(export.task_dir)
    [entry] = json.loads((task / "manifest.json").read_text())["samples"]
    assert entry["regions"] == [4, 1]
    region_map = cv2.imread(str(task / entry["region_map"]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(region_map, np.kron(small, np.ones((10, 10), dtype=np.int32)))
    todo = cv2.imread(str(task / entry["todo"]), cv2.IMREAD_UNCHANGED) == 255
    assert todo.sum() == 200 and todo[0, 10] and todo[10, 10] and not todo[0, 0]
    [ls_task] = json.loads((task / "tasks.json").read_text())
    assert ls_task["data"]["regions"] == [4, 1]
    assert ls_task["data"]["todo"] == f"/data/local-files/?d=tasks/{entry['todo']}"  # under the work dir
    [brush] = ls_task["predictions"][0]["result"]
    from orchestrator._labelstudio import brush_to_mask

    np.testing.assert_array_equal(brush_to_mask(brush["value"]["rle"], 20, 30), todo)
    with pytest.raises(ValueError, match=r"sample a b: asked region\(s\) \[9\] are not in its region map"):
        export_folder_tasks(table, ["a b"], tmp_path / "tasks2", CLASSES, round_index=3, kind="region",
                            regions={"a b": (small, [9])})
    with pytest.raises(ValueError, match="region task needs the region maps"):
        export_folder_tasks(table, ["a b"], tmp_path / "tasks3", CLASSES, round_index=3, kind="region")


@pytest.mark.parametrize("kind", ["folder", "label-studio"])
def test_region_runs_take_people_as_oracle(kind: str) -> None:
    cfg = config_from_dict(tiny_config(**{**REGION, "oracle": {"kind": kind}}))
    assert cfg.oracle.kind == kind and cfg.loop.unit == "region"


@pytest.mark.parametrize(("sections", "message"), [
    ({"oracle": {"kind": "crowd"}}, "oracle.kind"),
    ({"review": {"simulate_relabel": True}}, "review.simulate_relabel: not supported with loop.unit: region"),
])
def test_region_oracle_errors_name_the_key(sections: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict(tiny_config(**{**REGION, **sections}))
