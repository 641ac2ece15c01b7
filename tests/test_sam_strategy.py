"""The sam_disagreement strategy, the ``sam`` config section and the loop's check of what a strategy
declares (no torch, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator import ActiveLearningLoop, config_from_dict
from strategies import build_strategy, columns
from tests.conftest import tiny_config


def table() -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": ["a", "b", "c", "d", "e"],
        "labeled": [False, False, False, False, True],
        columns.SAM_DISAGREEMENT_MEAN: [0.1, 0.6, np.nan, 0.3, 0.9],
        columns.SAM_DISAGREEMENT_MAX: [0.9, 0.6, np.nan, 0.3, 0.9],
        columns.sam_class_column(2): [np.nan, 0.2, 0.4, 0.1, 0.9],
        columns.ENTROPY_MEAN: [0.9, 0.1, 0.5, 0.2, 0.0],
    })


def test_sam_disagreement_ranks_by_the_declared_column() -> None:
    rng = np.random.default_rng(0)
    assert build_strategy("sam_disagreement").select(table(), 3, rng) == ["b", "d", "a"]  # NaN last, labeled never
    assert build_strategy("sam_disagreement", aggregation="max").select(table(), 2, rng) == ["a", "b"]
    per_class = build_strategy("sam_disagreement", class_id=2)
    assert per_class.requirements().columns == {columns.sam_class_column(2)}
    assert per_class.select(table(), 2, rng) == ["c", "b"]
    reasons = build_strategy("sam_disagreement").select_with_reasons(table(), 1, rng).reason.tolist()
    assert reasons == ["sam_disagreement_mean 0.6 (rank 1)"]
    with pytest.raises(ValueError, match="option 'aggregation' must be one of mean, max"):
        build_strategy("sam_disagreement", aggregation="topk")
    with pytest.raises(ValueError, match="option 'class_id' must be a class id"):
        build_strategy("sam_disagreement", class_id=-1)


def test_fusion_with_sam_declares_both_columns() -> None:
    fusion = build_strategy("fusion", members={"entropy": 0.5, "sam_disagreement": 0.5})
    assert fusion.requirements().columns == {columns.ENTROPY_MEAN, columns.SAM_DISAGREEMENT_MEAN}
    assert len(fusion.select(table(), 3, np.random.default_rng(0))) == 3
    assert columns.is_sam_column(columns.SAM_DISAGREEMENT_MAX) and columns.is_sam_column(columns.sam_class_column(7))
    assert not columns.is_sam_column(columns.ENTROPY_MEAN)


def test_sam_config_section_is_checked_where_it_is_built() -> None:
    cfg = config_from_dict(tiny_config(sam={"enabled": True, "model_type": "tiny", "checkpoint": "w.pt",
                                            "prompts": {"skip_classes": [0], "negative_points": 1}}))
    assert cfg.sam.prompts.skip_classes == (0,) and cfg.flat()["sam.prompts.negative_points"] == 1
    assert config_from_dict(cfg.to_dict()) == cfg  # a resumed experiment compares equal
    for section, message in [
        ({"enabled": True}, r"sam\.checkpoint: required when sam\.enabled"),
        ({"model_type": "vit_x"}, r"sam\.model_type: 'vit_x' is not one of"),
        ({"prompts": {"skip_classes": "0"}}, r"sam\.prompts\.skip_classes: expected a list"),
        ({"prompts": {"min_area_px": 0}}, r"sam\.prompts\.min_area_px: must be >= 1"),
        ({"finetune": {"holdout_fraction": 1}}, r"sam\.finetune\.holdout_fraction: must be in \(0, 1\)"),
        ({"finetune": {"step": 3}}, r"unknown config key 'sam\.finetune\.step'"),
    ]:
        with pytest.raises(ValueError, match=message):
            config_from_dict(tiny_config(sam=section))


def test_loop_accepts_a_sam_strategy_only_with_sam_enabled(tmp_path: Path) -> None:
    off = config_from_dict(tiny_config(loop={"strategy": "sam_disagreement"}))
    with pytest.raises(ValueError, match="reads SAM agreement columns; set sam.enabled: true and sam.checkpoint"):
        ActiveLearningLoop(off, tmp_path / "a").start()  # refused at the start, before anything is written
    assert not (tmp_path / "a").exists()
    on = config_from_dict(tiny_config(
        loop={"strategy": "fusion", "strategy_options": {"members": {"entropy": 1, "sam_disagreement": {"weight": 1, "class_id": 1}}}},
        sam={"enabled": True, "model_type": "tiny", "checkpoint": "w.pt"}))
    unit = ActiveLearningLoop(on, tmp_path / "b").ctx.unit
    unit.check(on)
    assert unit.strategy.name == "fusion"
    bald = config_from_dict(tiny_config(loop={"strategy": "bald"}))  # the extended pass runs MC dropout
    assert ActiveLearningLoop(bald, tmp_path / "c").ctx.unit.strategy.requirements().mc_dropout_passes == 8
