"""``data.skip_unreadable``: a round runs on a pool with a corrupt image, which is never scored or
selected, and is listed in the round's MLflow run. (Refusal without the option, and the skip at
start, are in ``test_bad_input.py``.)"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from orchestrator import ActiveLearningLoop, config_from_dict
from workers import generate_synthetic, read_scores

from .conftest import tiny_config

pytestmark = pytest.mark.ray


def test_a_round_leaves_the_unreadable_pool_image_out(ray_cluster: None, tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_synthetic(root / "train", 12, 24, 32, seed=0, prefix="t")
    generate_synthetic(root / "val", 4, 24, 32, seed=1, prefix="v")
    broken = sorted((root / "train/images").iterdir())[5]
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    cfg = tiny_config(
        experiment={"name": "skip"},
        data={"kind": "folder", "train_dir": str(root / "train"), "val_dir": str(root / "val"), "image_size": [24, 32],
              "skip_unreadable": True},
        loop={"initial_labeled": 4, "budget": 7, "rounds": 1},  # 7 = every readable pool image
    )
    loop = ActiveLearningLoop(config_from_dict(cfg), tmp_path / "work")
    [result] = loop.run()
    sid = broken.stem
    assert sid not in result.added and len(result.added) == 7
    round_dir = loop.workdir / "rounds/round-001"
    assert sid not in set(pd.read_parquet(round_dir / "pool.parquet").sample_id)
    assert sid not in set(read_scores(str(round_dir / "scores")).sample_id)
    assert loop.stop_reason is not None
    listed = pd.read_csv(loop.workdir / "unreadable.csv")
    assert listed.sample_id.tolist() == [sid] and str(broken) in listed.error[0]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=loop.tracking_uri)
    child = result.extra["child_run_id"]
    assert "unreadable.csv" in [a.path for a in client.list_artifacts(child)]
