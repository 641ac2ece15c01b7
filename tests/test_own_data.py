"""Your own data: a pool folder where only some images have a mask (or none), validation held out
from what people label when there is no validation folder, and a pool that grows between rounds.
End to end on real Ray and a real MLflow store, with people answering through the task folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import workers
from orchestrator import ActiveLearningLoop, TableStore, config_from_dict
from orchestrator._cli import main as cli_main
from orchestrator._label_state import holdout_score

from .conftest import tiny_config

pytestmark = pytest.mark.ray

CLASSES = workers.ClassInfo(names=workers.SYNTHETIC_CLASSES.names, ignore_index=255)


def make_pool(root: Path, n: int, masked: int, *, seed: int = 0, prefix: str = "img") -> Path:
    """A pool folder of ``n`` synthetic images, the first ``masked`` with a mask; every mask is kept
    under ``root/truth`` (what people will draw)."""
    scratch = root / f"generated-{prefix}"
    workers.generate_synthetic(scratch, n, 32, 48, seed, prefix=prefix)
    pool = root / "pool"
    (pool / "images").mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(exist_ok=True)
    shutil.copy(scratch / "classes.json", pool / "classes.json")
    for k, image in enumerate(sorted((scratch / "images").iterdir())):
        shutil.copy(image, pool / "images" / image.name)
        shutil.copy(scratch / "masks" / image.name, root / "truth" / image.name)
        if k < masked:
            (pool / "masks").mkdir(exist_ok=True)
            shutil.copy(scratch / "masks" / image.name, pool / "masks" / image.name)
    return pool


def val_folder(root: Path) -> Path:
    workers.generate_synthetic(root / "val", 8, 32, 48, 99, prefix="val")
    return root / "val"


def answer(loop: ActiveLearningLoop, truth: Path, into: Path) -> Path:
    """People's answers to the awaited task: the true masks of the requested images."""
    task = Path(loop.awaiting_labels["task_dir"])
    manifest = json.loads((task / "manifest.json").read_text())
    into.mkdir(parents=True)
    for sample in manifest["samples"]:
        shutil.copy(truth / f"{sample['sample_id']}.png", into / f"{sample['name']}.png")
    return into


def folder_config(pool: Path, val: Path | None, **sections: dict[str, Any]) -> Any:
    data = {"kind": "folder", "train_dir": str(pool), "val_dir": str(val) if val else None, "image_size": [32, 48]}
    settings = {"data": data, "loop": {"strategy": "entropy", "budget": 6, "rounds": 2}, "oracle": {"kind": "folder"}}
    for key, value in sections.items():
        settings.setdefault(key, {}).update(value)
    return config_from_dict(tiny_config(**settings))


def test_a_few_seed_masks_train_round_one_and_people_label_the_rest(ray_cluster: None, tmp_path: Path) -> None:
    pool = make_pool(tmp_path, 30, masked=10)
    loop = ActiveLearningLoop(folder_config(pool, val_folder(tmp_path)), tmp_path / "work")
    state = loop.start()
    first = loop.store.read(state.revision)
    seeds = set(first.loc[first.labeled, "sample_id"])
    assert seeds == {f"img_{k:06d}" for k in range(10)} and (first.loc[first.labeled, "round_labeled"] == 0).all()
    assert "10 seed masks" in loop.store.info(state.revision).comment
    assert first.loc[~first.labeled & (first.split == "train"), "mask_path"].isna().all()  # no mask, no label

    assert loop.step() is None  # round 1 trains on the seeds, scores, exports, waits
    assert loop.state.round == 1 and loop.state.round_info["train"]["trained_on"] == 10
    trained = set(pd.read_csv(loop.workdir / "rounds/round-001/train_weights.csv").sample_id)
    assert trained == seeds
    asked = loop.awaiting_labels["requested"]
    assert len(asked) == 6 and not set(asked) & seeds
    assert "`preannotations/` holds the model's masks" in (Path(loop.awaiting_labels["task_dir"]) / "README.md").read_text()

    loop.import_labels(answer(loop, tmp_path / "truth", tmp_path / "answers1"))
    resumed = ActiveLearningLoop.resume(loop.workdir)
    result = resumed.step()  # round 1 finishes with the answers
    assert result is not None and result.round == 1 and set(result.added) == set(asked)
    assert resumed.step() is None  # round 2 trains on seeds + answers, then waits again
    info = resumed.state.round_info["train"]
    assert info["trained_on"] == 16
    assert set(pd.read_csv(resumed.workdir / "rounds/round-002/train_weights.csv").sample_id) == seeds | set(asked)


def test_with_no_mask_people_label_first_and_nothing_trains_before(ray_cluster: None, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pool = make_pool(tmp_path, 24, masked=0)
    cfg = folder_config(pool, val_folder(tmp_path), loop={"initial_labeled": 8, "initial_strategy": "cold_start",
                                                          "rounds": 1})
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    state = loop.start()
    assert state.round == 0 and loop.awaiting_labels is not None
    assert len(loop.awaiting_labels["requested"]) == 8
    manifest = json.loads((Path(loop.awaiting_labels["task_dir"]) / "manifest.json").read_text())
    assert manifest["round"] == 0 and all(s["preannotation"] is None for s in manifest["samples"])  # no model yet
    assert "preannotations/" not in (Path(loop.awaiting_labels["task_dir"]) / "README.md").read_text()
    assert loop.step() is None  # still waiting: nothing to train on
    assert not list(loop.workdir.rglob("model.pt")) and not (loop.workdir / "ray_train").exists()
    assert loop.status()["round"] == 0 and loop.status()["awaiting_labels"]["received"] == 0
    assert cli_main(["status", str(loop.workdir)]) == 0  # from another shell: the labels are awaited, not done
    now = [line for line in capsys.readouterr().out.splitlines() if line.startswith("now:")]
    assert now and "round 0 label: tasks exported, waiting for 8 of 8 labels" in now[0], now

    asked = list(loop.awaiting_labels["requested"])
    loop.import_labels(answer(loop, tmp_path / "truth", tmp_path / "answers0"))
    resumed = ActiveLearningLoop.resume(loop.workdir)
    assert resumed.step() is None  # round 0 closes; round 1 trains on people's labels, exports, waits
    assert resumed.state.round == 1 and resumed.state.round_info["train"]["trained_on"] == 8
    table = resumed.store.read(resumed.state.revision)
    assert (table.set_index("sample_id").loc[asked, "round_labeled"] == 0).all()
    assert (resumed.workdir / "rounds/round-001/model.pt").exists()
    assert not resumed.state.history  # round 0 trained nothing: no result, no MLflow run


def test_without_a_val_folder_validation_is_held_out_stably(ray_cluster: None, tmp_path: Path) -> None:
    pool = make_pool(tmp_path, 40, masked=14)
    loop = ActiveLearningLoop(folder_config(pool, None, data={"val_share": 0.3}), tmp_path / "work")
    store = TableStore(loop.workdir / "table")
    val_by_round, train_by_round = [], []
    for k in (1, 2):
        assert loop.step() is None  # trains, exports, waits
        round_dir = loop.workdir / f"rounds/round-00{k}"
        val_ids = set(pd.read_parquet(round_dir / "val_per_image.parquet").sample_id)
        train_ids = set(pd.read_csv(round_dir / "train_weights.csv").sample_id)
        assert val_ids and train_ids and not val_ids & train_ids
        val_by_round.append(val_ids)
        train_by_round.append(train_ids)
        loop.import_labels(answer(loop, tmp_path / "truth", tmp_path / f"answers{k}"))
        loop = ActiveLearningLoop.resume(loop.workdir)
        result = loop.step()
        assert result is not None and result.metrics["val_images"] == len(val_ids)
        assert any("validation image" in w and "noisy figure" in w for w in result.extra["warnings"])  # a handful: said, not fatal
    # validation only grows, training images never move to it (nor back)
    assert val_by_round[0] <= val_by_round[1] and not val_by_round[1] & train_by_round[1]
    final = store.read(loop.state.revision)
    held = final[(final.split == "val")]
    assert set(held.sample_id) >= val_by_round[1] and held.mask_path.notna().all()
    scores = held.sample_id.map(holdout_score)
    assert (scores < 0.3).sum() >= len(held) - 1  # the rule, plus at most the one that keeps validation non-empty


def test_images_added_between_rounds_are_scored_and_selected(ray_cluster: None, tmp_path: Path) -> None:
    pool = make_pool(tmp_path, 16, masked=16)
    cfg = config_from_dict(tiny_config(
        data={"kind": "folder", "train_dir": str(pool), "val_dir": str(val_folder(tmp_path)), "image_size": [32, 48]},
        loop={"strategy": "random", "initial_labeled": 8, "budget": 6, "rounds": 2}))
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    assert loop.step().round == 1  # 2 unlabeled images left
    new = tmp_path / "new"
    workers.generate_synthetic(new, 7, 32, 48, 7, prefix="new")
    (new / "metadata.csv").unlink()
    broken = new / "images" / "new_000006.png"
    broken.write_bytes(b"not a png")
    revisions = loop.store.revisions()
    with pytest.raises(ValueError, match="new_000006.png"):
        loop.add_images(new)
    assert loop.store.revisions() == revisions  # refused: nothing written
    broken.unlink()
    (new / "masks" / "new_000006.png").unlink()
    shutil.copy(pool / "images" / "img_000003.png", new / "images" / "copy_of_3.png")  # the same bytes, another name
    shutil.copy(pool / "masks" / "img_000003.png", new / "masks" / "copy_of_3.png")
    report = loop.add_images(new)
    assert sorted(report["added"]) == [f"new_{k:06d}" for k in range(6)]
    assert [Path(p).name for p, _ in report["duplicates"]] == ["copy_of_3.png"]
    assert loop.store.info(report["revision"]).comment.startswith("add images: +6 from")
    assert loop.add_images(new)["added"] == []  # added once

    result = loop.step()
    scores = pd.read_parquet(loop.workdir / "rounds/round-002/scores")
    assert set(report["added"]) <= set(scores.sample_id)  # scored
    assert len(set(result.added) & set(report["added"])) >= 4  # 6 picks among 2 old and 6 new images
    final = loop.store.read(result.revision)
    before = loop.store.read(loop.store.lineage(result.revision)[-1].id)
    kept = before[before.labeled].set_index("sample_id")
    assert (final.set_index("sample_id").loc[kept.index, "mask_path"] == kept.mask_path).all()  # nothing labeled changed


@pytest.mark.parametrize("case, message", [
    ("wrong_size", r"mask .*img_000001\.png: size \(height, width\) \(16, 16\) does not match its image \(32, 48\)"),
    ("bad_class", r"mask .*img_000002\.png: invalid class id\(s\) 9"),
    ("orphan_mask", r"masks without an image in .*, 1: ghost"),
    ("every_image_labeled", r"the unlabeled pool is empty"),
    ("simulated_without_masks", r"28 of 30 pool images have no mask .*img_000002, img_000003"),
])
def test_bad_seed_data_is_refused_naming_the_file_and_leaves_nothing(
    ray_cluster: None, tmp_path: Path, case: str, message: str
) -> None:
    pool = make_pool(tmp_path, 30, masked=30 if case == "every_image_labeled" else 3)
    sections: dict[str, Any] = {"data": {"masks": "labels"}} if case == "every_image_labeled" else {}
    if case == "wrong_size":
        workers.write_mask(pool / "masks" / "img_000001.png", np.zeros((16, 16), np.uint8))
    elif case == "bad_class":
        workers.write_mask(pool / "masks" / "img_000002.png", np.full((32, 48), 9, np.uint8))
    elif case == "orphan_mask":
        workers.write_mask(pool / "masks" / "ghost.png", np.zeros((32, 48), np.uint8))
    elif case == "simulated_without_masks":
        shutil.rmtree(pool / "masks")
        (pool / "masks").mkdir()
        for k in (0, 1):
            shutil.copy(tmp_path / "truth" / f"img_{k:06d}.png", pool / "masks")
        sections["oracle"] = {"kind": "simulated"}
    loop = ActiveLearningLoop(folder_config(pool, val_folder(tmp_path), **sections), tmp_path / "work")
    with pytest.raises(ValueError, match=message):
        loop.start()
    assert not (tmp_path / "work").exists()
