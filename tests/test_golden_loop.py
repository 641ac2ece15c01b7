"""Golden snapshots of whole experiments: what the loop writes must not change unless meant to.

Three tiny experiments on synthetic data (two image rounds with the simulated oracle, two region
rounds with the simulated region oracle, one image round labeled by people through a task folder)
are run and reduced to what defines them: ``state.json``, the table lineage with its comments, the
final table's label state, every ``selection.csv`` and every ``labeled_regions.parquet``. Ids that
are new in every run (the experiment uid, MLflow run ids), timings, the work dir's path and the
numbers a trained model produces (scores, metrics: they differ in the last bits between machines)
are masked; everything else is compared exactly. The strategies are the random ones and every
region costs one click, so what is selected and labeled depends only on the seed.

``SHOAL_UPDATE_GOLDEN=1 pytest tests/test_golden_loop.py`` rewrites ``tests/golden/*.json`` after a
change that is meant to alter what the loop writes; review the diff before committing it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import workers
from orchestrator import ActiveLearningLoop, TableStore, config_from_dict

from .conftest import tiny_config

pytestmark = pytest.mark.ray

GOLDEN = Path(__file__).parent / "golden"

IMAGE = tiny_config(loop={"strategy": "random", "rounds": 2})
REGION = tiny_config(
    loop={"unit": "region", "strategy": "region_random", "rounds": 2},
    regions={"method": "grid", "cell_px": 8, "budget_clicks": 20.0},
    cost={"purity_threshold": 0.0},  # every region one click, estimated and real: no model in the picks
)
PEOPLE = tiny_config(loop={"strategy": "random", "rounds": 1}, oracle={"kind": "folder"})

# Exact numbers the loop derives from the data and the seed alone (counts, clicks, pixels, weights).
EXACT_KEYS = {
    "added", "budget", "budget_clicks", "clicks", "cumulative_clicks", "cost_clicks", "estimated_clicks",
    "labeled_clicks", "labeled_count", "labeled_pixels", "labeled_pixels_added", "labeled_pixels_total",
    "labeled_regions", "max", "max_min_ratio", "min", "mixed_regions", "num_labeled", "num_rows", "queued_regions",
    "rank", "region_id", "regions", "regions_labeled", "requested", "round", "round_clicks", "round_labeled",
    "selected", "spent_before", "trained", "trained_on", "trained_on_clicks", "weight", "zero", "purity",
    "label_class", "mixed", "polygons", "vertices", "region_pixels", "num_scored", "num_regions", "found",
    "unchanged", "epochs_run", "best_epoch", "format", "ignore_index", "height", "width", "val_images",
}
MASKED_KEYS = {"experiment_uid", "parent_run_id", "child_run_id", "created", "seconds"}
_UID = re.compile(r"[0-9a-f]{32}")


def _normalize(value: Any, workdir: str, key: str = "") -> Any:
    """``value`` with run-specific ids, timings, paths (``workdir`` -> <tmp>) and model-made numbers masked."""
    if key in MASKED_KEYS or key.endswith("_seconds"):
        return "<masked>"
    if key.startswith("pred_"):  # what the model predicts (pred_dominant_class is an integer)
        return "<model>"
    if isinstance(value, dict):
        return {str(k): _normalize(v, workdir, str(k)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_normalize(v, workdir, key) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if key in EXACT_KEYS:
            return None if math.isnan(value) else round(float(value), 6)
        return "<float>"
    if isinstance(value, str):
        text = value.replace(workdir, "<tmp>")
        return _UID.sub("<uid>", text)
    if value is None:
        return None
    return str(value)


def _frame(df: pd.DataFrame, workdir: str) -> list[dict[str, Any]]:
    return [_normalize(row, workdir) for row in json.loads(df.to_json(orient="records"))]


def snapshot(loop: ActiveLearningLoop) -> dict[str, Any]:
    """What the experiment in ``loop.workdir`` wrote, masked (see the module's docstring)."""
    workdir = str(loop.workdir.parent)  # the test's tmp_path: the work dir and the answers folder
    state = json.loads((loop.workdir / "state.json").read_text())
    store = TableStore(loop.workdir / "table")
    revisions = store.revisions()
    lineage = [
        {k: v for k, v in vars(info).items() if k != "created"} for info in store.lineage(revisions[-1])
    ]
    final = store.read(revisions[-1])
    label_columns = [c for c in ("sample_id", "split", "labeled", "weight", "round_labeled", "mask_path", "clicks",
                                 "labeled_pixels", "partial", "regions_labeled", "needs_relabel", "excluded")
                     if c in final.columns]
    out: dict[str, Any] = {
        "state": _normalize(state, workdir),
        "revisions": revisions,
        "lineage": _normalize(lineage, workdir),
        "final_columns": sorted(final.columns),
        "final_label_state": _frame(final[label_columns], workdir),
        "rounds": {},
    }
    for round_dir in sorted((loop.workdir / "rounds").glob("round-*")):
        entry: dict[str, Any] = {}
        selection = round_dir / "selection.csv"
        if selection.exists():
            table = pd.read_csv(selection, dtype={"sample_id": str})
            entry["selection_columns"] = list(table.columns)
            entry["selection"] = _frame(table, workdir)
        regions = round_dir / "labeled_regions.parquet"
        if regions.exists():
            entry["labeled_regions"] = _frame(pd.read_parquet(regions), workdir)
        entry["files"] = sorted(p.name for p in round_dir.iterdir() if not p.name.startswith("."))
        out["rounds"][round_dir.name] = entry
    return out


def _check(name: str, got: dict[str, Any]) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(got, indent=1, sort_keys=True) + "\n"
    if os.environ.get("SHOAL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    expected = json.loads(path.read_text())
    if got != expected:  # the first difference, by path, before the whole structures
        diff = _first_difference(expected, json.loads(text))
        pytest.fail(f"{name}: the experiment differs from {path} at {diff}")


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only in {'golden' if k in a else 'this run'}"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{where}/{k}")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items in the golden file, {len(b)} now"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where}: golden {a!r}, now {b!r}"


def test_two_image_rounds(ray_cluster: None, tmp_path: Path) -> None:
    loop = ActiveLearningLoop(config_from_dict(IMAGE), tmp_path / "image")
    assert [r.round for r in loop.run()] == [1, 2]
    _check("image_rounds", snapshot(loop))


def test_two_region_rounds(ray_cluster: None, tmp_path: Path) -> None:
    loop = ActiveLearningLoop(config_from_dict(REGION), tmp_path / "region")
    assert [r.round for r in loop.run()] == [1, 2]
    _check("region_rounds", snapshot(loop))


def test_an_image_round_labeled_by_people(ray_cluster: None, tmp_path: Path) -> None:
    loop = ActiveLearningLoop(config_from_dict(PEOPLE), tmp_path / "people")
    assert loop.step() is None  # trained, selected, exported: waits for people
    task = Path(loop.awaiting_labels["task_dir"])
    manifest = json.loads((task / "manifest.json").read_text())
    table = loop.store.read(loop.state.revision).set_index("sample_id")
    answers = tmp_path / "answers"
    answers.mkdir()
    classes = workers.ClassInfo(names=workers.SYNTHETIC_CLASSES.names, ignore_index=255)
    for sample in manifest["samples"][:-1]:  # one left out: a partial import
        mask = workers.load_mask(str(table.loc[sample["sample_id"], "mask_path"]), classes)
        workers.write_mask(answers / f"{sample['name']}.png", mask)
    report = loop.import_labels(answers)
    assert len(report["added"]) == len(manifest["samples"]) - 1
    resumed = ActiveLearningLoop.resume(loop.workdir)
    result = resumed.step()
    assert result is not None and result.round == 1
    _check("people_round", snapshot(resumed))
