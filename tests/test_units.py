"""The acquisition-unit contract, run over every unit: what each phase may rely on whichever unit
an experiment labels by (``orchestrator._units.UNITS``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator import ActiveLearningLoop, TableStore, config_from_dict
from orchestrator._units import UNITS, build_unit

from .conftest import tiny_config

SETTINGS = {
    "image": {"loop": {"unit": "image", "strategy": "entropy", "rounds": 1}},
    "region": {"loop": {"unit": "region", "strategy": "region_uncertainty", "rounds": 1},
               "regions": {"method": "grid", "cell_px": 8, "budget_clicks": 30.0}},
}


def config(unit: str, **sections: dict) -> object:
    settings = {k: dict(v) for k, v in SETTINGS[unit].items()}
    for key, value in sections.items():
        settings.setdefault(key, {}).update(value)
    return config_from_dict(tiny_config(**settings))


def test_every_unit_has_settings_here() -> None:
    assert set(UNITS) == set(SETTINGS)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_the_builder_picks_the_unit_the_config_names(unit: str) -> None:
    built = build_unit(config(unit))
    assert isinstance(built, UNITS[unit]) and built.name == unit
    built.check(config(unit))  # the unit's own strategy passes its own check
    assert built.strategy.name == SETTINGS[unit]["loop"]["strategy"]


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_strategy_options_are_checked_when_the_unit_is_built(unit: str) -> None:
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        build_unit(config(unit, loop={"strategy_options": {"bogus": 1}}))


def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": ["a", "b", "c", "d", "val/e"],
        "image_path": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        "mask_path": ["a_m.png", "b_m.png", "c_m.png", "d_m.png", "e_m.png"],
        "split": ["train", "train", "train", "train", "val"],
        "labeled": [True, True, False, False, False],
        "weight": [1.0, 1.0, 0.0, 0.0, 0.0],
        "round_labeled": [0, 0, -1, -1, -1],
        "clicks": [10.0, 10.0, 0.0, 0.0, 0.0],
        "labeled_pixels": [100, 100, 0, 0, 0],
    })


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_the_open_pool_is_unlabeled_train_rows_at_the_start(unit: str) -> None:
    built = build_unit(config(unit))
    table = built.prepare_table(_table())
    assert built.open_pool(table).tolist() == [False, False, True, True, False]  # never val, never whole images
    factors = built.weight_factors(table[table.labeled])
    assert factors is None or np.allclose(factors.reindex(["a", "b"]).to_numpy(), 1.0)  # whole images weigh 1


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_a_round_of_each_unit_keeps_the_contract(unit: str, ray_cluster: None, tmp_path: Path) -> None:
    loop = ActiveLearningLoop(config(unit), tmp_path / unit)
    start_revision = loop.start().revision
    store = TableStore(loop.workdir / "table")
    before = store.read(start_revision)
    pool_before = set(before.loc[loop.ctx.unit.open_pool(before), "sample_id"])
    result = loop.step()
    assert result is not None and loop.done
    info = loop.state.history[-1]
    after = store.read(result.revision)
    # the label revision is a child of the revision the round trained on, written in this round
    assert store.info(result.revision).parent == start_revision and store.info(result.revision).round == 1
    # what was selected came from the open pool, and is labeled (whole or in part) in round 1 now
    selection = pd.read_csv(loop.workdir / "rounds/round-001/selection.csv", dtype={"sample_id": str})
    assert len(selection) > 0 and set(selection.sample_id) <= pool_before
    assert selection["rank"].tolist() == list(range(1, len(selection) + 1))
    assert selection.reason.notna().all() and (selection.reason.str.len() > 0).all()  # the select phase's reasons
    added = set(result.added)
    assert added and added <= set(selection.sample_id)
    rows = after.set_index("sample_id").loc[sorted(added)]
    assert rows.labeled.all() and (rows.round_labeled == 1).all() and (rows.weight > 0).all()
    # nothing labeled before changed its round; the clicks grew by what the round spent
    kept = before[before.labeled].set_index("sample_id")
    assert (after.set_index("sample_id").loc[kept.index, "round_labeled"] == kept.round_labeled).all()
    assert result.extra["clicks"] == pytest.approx(result.extra["trained_on_clicks"] + result.metrics["round_clicks"])
    assert result.metrics["round_clicks"] > 0
    assert info["extra"]["clicks"] == pytest.approx(after.loc[after.labeled, "clicks"].sum())
