"""Training weight policies and stopping criteria: pure functions of the table and the history."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from strategies import (
    StopDecision,
    any_of,
    budget_spent,
    columns,
    compute_weights,
    low_uncertainty,
    manual_override,
    miou_plateau,
    pool_exhausted,
    register_reweighting,
    reweighting_names,
    stopping_rule,
)


def labeled_table(loss: list[float], labeled: list[bool] | None = None) -> pd.DataFrame:
    n = len(loss)
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)],
        "labeled": labeled if labeled is not None else [True] * n,
        columns.TRAIN_LOSS: loss,
    })


# -- reweighting --------------------------------------------------------------------------------------


def test_uniform_weights_cover_the_labeled_rows_only() -> None:
    w = compute_weights("uniform", labeled_table([0.1, 0.2, 0.3], labeled=[True, False, True]))
    assert w.index.tolist() == ["s0", "s2"] and w.name == "weight"
    assert w.tolist() == [1.0, 1.0]


def test_loss_weights_follow_the_loss_with_the_ratio_capped() -> None:
    loss = [0.0, 0.05, 0.5, 1.0, 2.0, 50.0, np.nan]
    w = compute_weights("loss", labeled_table(loss), offset=0.1, max_ratio=4.0)
    assert w.mean() == pytest.approx(1.0)
    assert w.max() / w.min() <= 4.0 + 1e-9
    assert np.all(np.diff(w.iloc[:6].to_numpy()) >= 0)  # more loss, more weight
    assert w["s6"] == pytest.approx(float(np.median(w.iloc[:6])), rel=0.3)  # no loss yet: the median
    uncapped = compute_weights("loss", labeled_table([0.1, 0.2, 0.3]), offset=0.0, max_ratio=10.0)
    assert uncapped.tolist() == pytest.approx([0.5, 1.0, 1.5])


def test_loss_weights_reject_bad_losses_and_options() -> None:
    with pytest.raises(ValueError, match="sample_id 's1' has loss -0.5"):
        compute_weights("loss", labeled_table([0.1, -0.5]))
    with pytest.raises(ValueError, match="'max_ratio' must be a number >= 1"):
        compute_weights("loss", labeled_table([0.1]), max_ratio=0.5)
    with pytest.raises(ValueError, match="needs the per-sample loss column 'train_loss'"):
        compute_weights("loss", labeled_table([0.1]).drop(columns=[columns.TRAIN_LOSS]))


def test_class_content_weights_rare_class_images_up_to_the_cap() -> None:
    shares = np.array([
        [1.0, 0.0, 0.0],
        [0.9, 0.1, 0.0],
        [0.95, 0.0, 0.05],
        [1.0, 0.0, 0.0],
    ])
    table = pd.DataFrame({"sample_id": ["a", "b", "c", "d"], "labeled": True,
                          **{columns.label_fraction_column(k): shares[:, k] for k in range(3)}})
    w = compute_weights("class_content", table, max_ratio=100.0)
    # class frequencies: 0.9625, 0.025, 0.0125 -> inverse 1, 38.5, 77
    assert w["c"] / w["a"] == pytest.approx(77.0)
    assert w["b"] / w["a"] == pytest.approx(38.5)
    assert w["a"] == w["d"] and w.mean() == pytest.approx(1.0)
    capped = compute_weights("class_content", table, max_ratio=5.0)
    assert capped.max() / capped.min() == pytest.approx(5.0)


def test_manual_override_zero_excludes_but_keeps_the_sample() -> None:
    w = compute_weights("uniform", labeled_table([0.1, 0.2, 0.3]))
    out = manual_override(w, {"s1": 0.0, "s2": 3.0})
    assert out.to_dict() == {"s0": 1.0, "s1": 0.0, "s2": 3.0}
    assert w.to_dict() == {"s0": 1.0, "s1": 1.0, "s2": 1.0}  # a new Series


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nope": 1.0}, "sample_id 'nope': not a labeled sample"),
        ({"s1": -1.0}, "sample_id 's1': -1.0 is not a finite number >= 0"),
        ({"s0": float("nan")}, "sample_id 's0': nan is not a finite number"),
        ({"s0": float("inf")}, "sample_id 's0': inf is not"),
        ({"s0": 0.0, "s1": 0.0}, "every labeled sample at weight 0"),
    ],
)
def test_manual_override_errors_name_the_id(overrides: dict[str, float], message: str) -> None:
    w = compute_weights("uniform", labeled_table([0.1, 0.2]))
    with pytest.raises(ValueError, match=message):
        manual_override(w, overrides)


def test_reweighting_registry_is_strict() -> None:
    assert {"uniform", "loss", "class_content"} <= set(reweighting_names())
    with pytest.raises(ValueError, match="unknown reweighting policy 'los'; registered: class_content, loss"):
        compute_weights("los", labeled_table([0.1]))
    with pytest.raises(ValueError, match="policy 'loss' has no option 'cap'; valid options: max_ratio, offset"):
        compute_weights("loss", labeled_table([0.1]), cap=3)
    with pytest.raises(ValueError, match="already registered"):
        register_reweighting("uniform")(lambda table: table)


# -- stopping -------------------------------------------------------------------------------------------


def history(miou: list[float | None], labeled_step: int = 10, pool_start: int = 100,
            uncertainty: list[float | None] | None = None) -> list[dict[str, Any]]:
    return [
        {"labeled_count": labeled_step * (i + 1), "val_miou": m, "pool_size": pool_start - labeled_step * (i + 1),
         "pool_uncertainty_mean": None if uncertainty is None else uncertainty[i]}
        for i, m in enumerate(miou)
    ]


def test_budget_spent() -> None:
    rule = budget_spent(30)
    assert rule(history([0.1, 0.2, 0.3])) == StopDecision(True, "labeling budget spent: 30 labeled >= total_budget 30")
    assert not rule(history([0.1, 0.2])).stop
    assert not rule([]).stop


def test_pool_exhausted() -> None:
    assert pool_exhausted()(history([0.1, 0.2], labeled_step=10, pool_start=20)).stop
    assert not pool_exhausted()(history([0.1, 0.2], labeled_step=10, pool_start=21)).stop


def test_miou_plateau() -> None:
    rule = miou_plateau(rounds=2, min_delta=0.01)
    flat = rule(history([0.30, 0.40, 0.405, 0.402]))
    assert flat.stop and "plateau" in flat.reason and "gain +0.0050 < min_delta 0.01" in flat.reason
    assert not rule(history([0.30, 0.40, 0.405, 0.43])).stop
    assert not rule(history([0.30, 0.40])).stop  # not enough rounds to tell
    assert not rule(history([0.30, None, 0.40, float("nan")])).stop  # rounds without mIoU are skipped


def test_low_uncertainty() -> None:
    rule = low_uncertainty(0.05)
    assert rule(history([0.1, 0.2], uncertainty=[0.2, 0.04])).stop
    assert not rule(history([0.1, 0.2], uncertainty=[0.04, 0.2])).stop
    assert not rule(history([0.1], uncertainty=[None])).stop


def test_any_of_and_the_config_rule() -> None:
    h = history([0.30, 0.40, 0.401, 0.402], uncertainty=[0.3, 0.2, 0.1, 0.01])
    both = any_of(miou_plateau(2, 0.01), low_uncertainty(0.05))(h)
    assert both.stop and "plateau" in both.reason and "pool uncertainty 0.01" in both.reason
    assert not any_of(budget_spent(1000), low_uncertainty(0.001))(h).stop
    assert stopping_rule(total_budget=40)(h).stop
    assert not stopping_rule(total_budget=1000, plateau_rounds=1, min_delta=0.0)(h).stop
    assert stopping_rule()(history([0.1], labeled_step=100, pool_start=100)).stop  # the pool ran out


def test_history_and_config_are_checked() -> None:
    with pytest.raises(ValueError, match="round history entry 1 lacks 'val_miou'"):
        miou_plateau(1, 0.0)([{"val_miou": 0.1}, {"labeled_count": 3}])
    with pytest.raises(ValueError, match="total_budget must be a positive number"):
        budget_spent(0)
    with pytest.raises(ValueError, match="plateau rounds must be an integer >= 1"):
        miou_plateau(0, 0.01)
