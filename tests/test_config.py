"""Config loading: strict keys, types and values, named by their key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


# sweep.yaml is a sweep config, not an experiment config: tests/test_sweep.py loads it.
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "sweep.yaml"))
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.loop.budget > 0


def test_overrides_are_typed() -> None:
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["train.epochs=3", "loop.strategy=margin", "data.image_size=[32, 48]"])
    assert cfg.train.epochs == 3
    assert cfg.loop.strategy == "margin"
    assert cfg.data.image_size == (32, 48)
    assert cfg.flat()["train.epochs"] == 3


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"epoch": 3}}, r"unknown config key 'train\.epoch'"),
        ({"trian": {}}, r"unknown config key 'trian'"),
        ({"train": {"epochs": "three"}}, r"train\.epochs: expected an integer"),
        ({"train": {"epochs": 0}}, r"train\.epochs: must be positive"),
        ({"train": {"use_gpu": "yes"}}, r"train\.use_gpu: expected true or false"),
        ({"loop": {"strategy": "entopy"}}, r"loop\.strategy: unknown strategy 'entopy'; registered: .*entropy"),
        ({"data": {"kind": "folders"}}, r"data\.kind: 'folders' is not one of"),
        ({"data": {"kind": "folder"}}, r"data\.train_dir: required"),
        ({"data": {"image_size": [96]}}, r"data\.image_size: expected a list of 2"),
        ({"data": {"val_share": 1.0}}, r"data\.val_share: must be in \(0, 1\)"),
        ({"data": {"val_share": 0}}, r"data\.val_share: must be in \(0, 1\)"),
        ({"data": {"masks": "truth"}}, r"data\.masks: 'truth' is not one of 'auto', 'labels', 'ground_truth'"),
        ({"train": 3}, r"train: expected a mapping"),
    ],
)
def test_bad_config_names_the_field(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_bad_override_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        load_config(ROOT / "configs/quickstart.yaml", ["train.epochs"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("loop:\n  budjet: 4\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown config key 'loop\.budjet'"):
        load_config(typo)
