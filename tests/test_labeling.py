"""People in the loop: export, pause, validated import (folder and Label Studio), resume, edits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import workers
from orchestrator import ActiveLearningLoop, TableStore, config_from_dict
from orchestrator._labeling import read_answers, task_name
from orchestrator._labelstudio import brush_to_mask, decode_rle, encode_rle, label_studio_spec, mask_to_brush

from .conftest import tiny_config

pytestmark = pytest.mark.ray


def ground_truth(loop: ActiveLearningLoop, sample_id: str) -> np.ndarray:
    df = loop.store.read(loop.state.revision).set_index("sample_id")
    return cv2.imread(str(df.loc[sample_id, "mask_path"]), cv2.IMREAD_UNCHANGED)


def write_answers(loop: ActiveLearningLoop, folder: Path, ids: list[str]) -> None:
    manifest = json.loads((Path(loop.awaiting_labels["task_dir"]) / "manifest.json").read_text())
    names = {s["sample_id"]: s["name"] for s in manifest["samples"]}
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for sid in ids:
        cv2.imwrite(str(folder / "masks" / f"{names[sid]}.png"), ground_truth(loop, sid))


def snapshot(workdir: Path) -> tuple[list[str], str]:
    return TableStore(workdir / "table").revisions(), (workdir / "state.json").read_text()


@pytest.fixture(scope="module")
def paused(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> ActiveLearningLoop:
    cfg = config_from_dict(tiny_config(oracle={"kind": "folder"}, loop={"rounds": 2}, review={"relabel_top_k": 2}))
    loop = ActiveLearningLoop(cfg, tmp_path_factory.mktemp("people") / "work")
    assert loop.step() is None  # round 1 trains, scores, selects, exports, then waits
    return loop


def test_round_pauses_with_a_task_folder(paused: ActiveLearningLoop) -> None:
    request = paused.awaiting_labels
    assert request is not None and len(request["requested"]) == 6 and not request["received"]
    task = Path(request["task_dir"])
    manifest = json.loads((task / "manifest.json").read_text())
    assert [s["sample_id"] for s in manifest["samples"]] == request["requested"]
    for s in manifest["samples"]:
        assert (task / s["image"]).is_file()
        pre = cv2.imread(str(task / s["preannotation"]), cv2.IMREAD_UNCHANGED)
        assert pre.shape == (s["height"], s["width"]) and pre.max() < 5
    # the review's relabel queue goes out through the same oracle mechanism
    queue = (paused.workdir / "rounds/round-001/relabel_queue.csv").read_text().splitlines()
    relabel = json.loads((paused.workdir / "rounds/round-001/relabel/manifest.json").read_text())
    assert relabel["kind"] == "relabel" and len(relabel["samples"]) == 2 == len(queue) - 1
    issues = [float(line.split(",")[1]) for line in queue[1:]]
    assert issues == sorted(issues, reverse=True)
    status = paused.status()["awaiting_labels"]
    assert status["requested"] == 6 and status["received"] == 0 and len(status["missing"]) == 6
    assert paused.step() is None  # nothing imported yet: still waiting


def corrupt_cases(loop: ActiveLearningLoop, root: Path) -> list[tuple[Path, str]]:
    ids = loop.awaiting_labels["requested"]
    manifest = json.loads((Path(loop.awaiting_labels["task_dir"]) / "manifest.json").read_text())
    name = manifest["samples"][0]["name"]
    gt = ground_truth(loop, ids[0])
    cases = []

    def case(tag: str, write) -> None:
        folder = root / tag
        write_answers(loop, folder, ids[1:3])  # two good files next to the bad one
        write(folder / "masks")
        cases.append((folder, tag))

    case("unreadable", lambda d: (d / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"))
    case("size", lambda d: cv2.imwrite(str(d / f"{name}.png"), gt[:-2]))
    case("ids", lambda d: cv2.imwrite(str(d / f"{name}.png"), np.full_like(gt, 7)))
    case("outside-selection", lambda d: cv2.imwrite(str(d / "not_selected_999.png"), gt))
    outside = root / "elsewhere.png"
    cv2.imwrite(str(outside), gt)
    case("escape", lambda d: os.symlink(outside, d / f"{name}.png"))
    return cases


def test_every_bad_file_is_named_and_nothing_is_added(paused: ActiveLearningLoop, tmp_path: Path) -> None:
    expected = {"unreadable": "cannot decode", "size": "does not match its image", "ids": "invalid class id",
                "outside-selection": "not one of the 6 samples", "escape": "outside the label source"}
    before = snapshot(paused.workdir)
    for folder, tag in corrupt_cases(paused, tmp_path):
        with pytest.raises(ValueError, match=expected[tag]) as err:
            paused.import_labels(folder)
        assert str(folder / "masks") in str(err.value) or tag == "escape"
        assert snapshot(paused.workdir) == before, tag
    assert not paused.awaiting_labels["received"]


def test_partial_then_idempotent_then_complete_import_and_resume(paused: ActiveLearningLoop, tmp_path: Path) -> None:
    ids = paused.awaiting_labels["requested"]
    first = tmp_path / "batch1"
    write_answers(paused, first, ids[:3])
    report = paused.import_labels(first)
    assert sorted(report["added"]) == sorted(ids[:3])
    revs = TableStore(paused.workdir / "table").revisions()
    again = paused.import_labels(first)  # same labels twice: nothing changes
    assert again["added"] == [] and again["unchanged"] == 3
    assert TableStore(paused.workdir / "table").revisions() == revs
    # a fresh process sees the partial import
    reopened = ActiveLearningLoop.resume(paused.workdir)
    assert sorted(reopened.awaiting_labels["received"]) == sorted(ids[:3])
    second = tmp_path / "batch2"
    write_answers(paused, second, ids)
    assert sorted(reopened.import_labels(second)["added"]) == sorted(ids[3:])
    result = reopened.step()
    assert result is not None and result.round == 1 and sorted(result.added) == sorted(ids)
    df = reopened.store.read(result.revision)
    labeled = df[df.labeled]
    assert set(labeled.loc[labeled.round_labeled == 1, "sample_id"]) == set(ids)
    for sid in ids:  # the imported masks are the ones used for training
        path = df.set_index("sample_id").loc[sid, "mask_path"]
        assert str(reopened.workdir / "labels") in path
        assert (cv2.imread(path, cv2.IMREAD_UNCHANGED) == ground_truth(reopened, sid)).all()
    chain = [i.comment for i in reopened.store.lineage(result.revision)]
    assert chain[0].startswith("import labels: 3") and chain[1].startswith("import labels: 3")
    paused.state = reopened.state  # the module's later tests continue from here


def test_edits_are_revisions_with_comments(paused: ActiveLearningLoop, tmp_path: Path) -> None:
    loop = ActiveLearningLoop.resume(paused.workdir)
    assert loop.state.phase == "" and loop.state.round == 2
    df = loop.store.read(loop.state.revision)
    labeled = df.loc[df.labeled, "sample_id"].tolist()
    r1 = loop.edit(weights={labeled[0]: 3.0}, comment="upweight a hard case")
    r2 = loop.edit(exclude={labeled[1]: True}, comment="blurry image")
    r3 = loop.edit(relabel=[labeled[2]], comment="boundary looks wrong")
    chain = loop.store.lineage(r3)
    assert [c.id for c in chain[:3]] == [r3, r2, r1]
    assert [c.comment for c in chain[:3]] == ["edit: boundary looks wrong", "edit: blurry image", "edit: upweight a hard case"]
    final = loop.store.read(r3).set_index("sample_id")
    assert final.loc[labeled[0], "weight"] == 3.0
    assert final.loc[labeled[1], "weight"] == 0.0 and final.loc[labeled[1], "excluded"]
    assert final.loc[labeled[1], "labeled"]  # excluded from training, kept in the table
    assert final.loc[labeled[2], "needs_relabel"]
    with pytest.raises(ValueError, match="unknown train sample id"):
        loop.edit(weights={"nope": 1.0}, comment="x")
    with pytest.raises(ValueError, match="finite"):
        loop.edit(weights={labeled[0]: -1.0}, comment="x")
    assert loop.state.revision == r3
    # the relabel queue goes out through the oracle and comes back as a revision
    task = loop.workdir / "relabel" / r3
    manifest = json.loads((task / "manifest.json").read_text())
    assert [s["sample_id"] for s in manifest["samples"]] == [labeled[2]]
    answer = tmp_path / "relabel"
    (answer / "masks").mkdir(parents=True)
    fixed = np.zeros_like(ground_truth(loop, labeled[2]))
    cv2.imwrite(str(answer / "masks" / f"{manifest['samples'][0]['name']}.png"), fixed)
    report = loop.import_labels(answer, task_dir=task)
    assert report["added"] == [labeled[2]]
    after = loop.store.read(loop.state.revision).set_index("sample_id")
    assert not after.loc[labeled[2], "needs_relabel"]
    assert (cv2.imread(after.loc[labeled[2], "mask_path"], cv2.IMREAD_UNCHANGED) == 0).all()
    assert loop.store.info(loop.state.revision).parent == r3


def test_label_studio_round_trip(ray_cluster: None, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(oracle={"kind": "label-studio"}, loop={"rounds": 1}))
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    assert loop.step() is None
    task = Path(loop.awaiting_labels["task_dir"])
    tasks = json.loads((task / "tasks.json").read_text())
    manifest = json.loads((task / "manifest.json").read_text())
    assert len(tasks) == 6
    # the brush pre-annotations decode back to the pre-annotation PNGs
    first = manifest["samples"][0]
    pre = cv2.imread(str(task / first["preannotation"]), cv2.IMREAD_UNCHANGED)
    names = ["seabed", "pipeline", "anode", "rock", "leak"]
    for result in tasks[0]["predictions"][0]["result"]:
        region = brush_to_mask(result["value"]["rle"], first["height"], first["width"])
        assert (region == (pre == names.index(result["value"]["brushlabels"][0]))).all()
    # what Label Studio exports after annotation: tasks with brush results (one label per result)
    exported = []
    for k, t in enumerate(tasks):
        sid = t["data"]["sample_id"]
        gt = ground_truth(loop, sid)
        result = [{"id": f"r{c}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
                   "original_width": gt.shape[1], "original_height": gt.shape[0], "image_rotation": 0,
                   "value": {"format": "rle", "rle": mask_to_brush(gt == c), "brushlabels": [names[c]]}}
                  for c in np.unique(gt) if c < 5]
        annotations = [] if k == 5 else [{"id": 100 + k, "completed_by": 1, "was_cancelled": False,
                                          "updated_at": "2026-11-22T10:00:00Z", "result": result}]
        exported.append({"id": 1 + k, "data": t["data"], "annotations": annotations, "predictions": []})
    export = tmp_path / "project-1-at-2026-11-22.json"
    export.write_text(json.dumps(exported))
    report = loop.import_labels(export)
    assert len(report["added"]) == 5  # the unannotated task is a partial import
    df = loop.store.read(report["revision"]).set_index("sample_id")
    for t in tasks[:5]:
        sid = t["data"]["sample_id"]
        assert (cv2.imread(df.loc[sid, "mask_path"], cv2.IMREAD_UNCHANGED) == ground_truth(loop, sid)).all()
    bad = json.loads(export.read_text())
    bad[0]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["kelp"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    before = snapshot(loop.workdir)
    with pytest.raises(ValueError, match="'kelp'.* not in the label map"):
        loop.import_labels(tmp_path / "bad.json")
    assert snapshot(loop.workdir) == before
    result = loop.step()
    assert result is not None and len(result.added) == 5
    assert loop.state.history[-1]["added"] == result.added


def test_rle_round_trip() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, 5000).astype(np.uint8)
    assert (decode_rle(encode_rle(values)) == values).all()
    region = rng.random((40, 70)) > 0.6
    assert (brush_to_mask(mask_to_brush(region), 40, 70) == region).all()
    with pytest.raises(ValueError, match="RGBA image needs"):
        brush_to_mask(mask_to_brush(region), 41, 70)


def _ls_manifest(tmp_path: Path) -> tuple[dict, Any]:
    classes = workers.ClassInfo(names=("background", "crack"), ignore_index=255)
    samples = [{"sample_id": sid, "name": task_name(sid), "image": f"images/{task_name(sid)}.png", "height": 4,
                "width": 6, "preannotation": None} for sid in ("siteA/img1", "siteB/img1", "img2")]
    return {"round": 2, "samples": samples}, classes


def _ls_task(task_id: int, data: dict, labels: list[str]) -> dict:
    region = np.zeros((4, 6), bool)
    region[1:3, 2:4] = True
    result = [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 6,
               "original_height": 4, "value": {"format": "rle", "rle": mask_to_brush(region), "brushlabels": labels}}]
    return {"id": task_id, "data": data, "annotations": [{"id": 1, "result": result}]}


def test_label_studio_tasks_without_sample_id_are_matched_by_the_image_file(tmp_path: Path) -> None:
    manifest, classes = _ls_manifest(tmp_path)
    export = tmp_path / "export.json"
    export.write_text(json.dumps([
        _ls_task(71, {"image": "/data/local-files/?d=runs/exp/rounds/round-002/tasks/images/img2.png"}, ["crack"]),
        _ls_task(72, {"image": "s3://bucket/pool/images/img2.png?X-Amz-Signature=abc"}, ["crack"]),
    ]))
    with pytest.raises(ValueError, match="a second mask for sample img2"):
        read_answers(export, manifest, classes)
    export.write_text(json.dumps([_ls_task(71, {"image": "/data/local-files/?d=x/images/img2.png"}, ["crack"])]))
    [answer] = read_answers(export, manifest, classes)
    assert answer.sample_id == "img2" and (answer.mask == 1).sum() == 4 and "Label Studio task 71" in answer.source


@pytest.mark.parametrize("data, labels, message", [
    ({"image": "/data/local-files/?d=pool/images/img9.png"}, ["crack"],
     r"Label Studio task 7: image '.*img9.png' is not one of the 3 images of this request \(round 2\)"),
    ({"sample_id": "img9", "image": "x.png"}, ["crack"],
     r"Label Studio task 7: sample 'img9' is not in this request .* another project or round"),
    ({"image": "http://files/pool/img1.png"}, ["crack"],
     r"Label Studio task 7: image 'http://files/pool/img1.png' matches 2 requested images \(siteA/img1, siteB/img1\)"),
    ({"sample_id": "img2"}, ["kelp"], r"Label Studio task 7: label \['kelp'\] is not in the label map"),
])
def test_bad_label_studio_exports_are_refused_naming_the_task(tmp_path: Path, data: dict, labels: list[str],
                                                             message: str) -> None:
    manifest, classes = _ls_manifest(tmp_path)
    export = tmp_path / "export.json"
    export.write_text(json.dumps([_ls_task(7, data, labels)]))
    with pytest.raises(ValueError, match=message):
        read_answers(export, manifest, classes)


def test_label_studio_spec_names_every_class_and_serves_every_round(tmp_path: Path) -> None:
    spec = label_studio_spec(("background", "crack"), {"bg": 0, "fissure": 1, "crack": 1}, tmp_path / "work", None, None)
    assert spec.names == ("bg", "fissure") and spec.by_name() == {"bg": 0, "fissure": 1}
    xml = spec.label_config()
    assert '<BrushLabels name="tag" toName="image">' in xml and '<Label value="fissure" background="#' in xml
    image = tmp_path / "work" / "rounds" / "round-007" / "tasks" / "images" / "a b.png"
    assert spec.image_url(image) == "/data/local-files/?d=rounds/round-007/tasks/images/a%20b.png"
    served = label_studio_spec(("background", "crack"), None, tmp_path / "work", "http://files:9000/exp/", None)
    assert served.image_url(image) == "http://files:9000/exp/rounds/round-007/tasks/images/a%20b.png"
    with pytest.raises(ValueError, match=r"oracle.label_map: no Label Studio name for class 1 \(crack\)"):
        label_studio_spec(("background", "crack"), {"bg": 0}, tmp_path, None, None)
    with pytest.raises(ValueError, match=r"oracle.label_map: 'x' -> 5 is not a class id"):
        label_studio_spec(("background", "crack"), {"bg": 0, "crack": 1, "x": 5}, tmp_path, None, None)
    with pytest.raises(ValueError, match="oracle.local_files_root: .* does not hold"):
        label_studio_spec(("a", "b"), None, tmp_path / "work", None, str(tmp_path / "elsewhere")).image_url(image)
