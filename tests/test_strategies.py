"""Contract and behaviour tests for every registered strategy (no torch, no Ray)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import strategies
from strategies import build_strategy, columns, strategy_names


def score_table(n: int = 50, seed: int = 0, labeled_every: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "sample_id": [f"s{i:03d}" for i in range(n)],
        "labeled": [i % labeled_every == 0 for i in range(n)],
        columns.ENTROPY_MEAN: rng.random(n),
        columns.MARGIN_MEAN: rng.random(n),
        columns.LEAST_CONFIDENCE_MEAN: rng.random(n),
    })


@pytest.mark.parametrize("name", strategy_names())
def test_contract_exact_budget_no_labeled_no_duplicates(name: str) -> None:
    table = score_table()
    picked = build_strategy(name).select(table, 12, np.random.default_rng(1))
    assert len(picked) == 12
    assert len(set(picked)) == 12
    labeled = set(table.loc[table.labeled, "sample_id"])
    assert not labeled & set(picked)
    assert set(picked) <= set(table.sample_id)


@pytest.mark.parametrize("name", strategy_names())
def test_contract_budget_larger_than_pool_is_a_clear_error(name: str) -> None:
    table = score_table(n=10)  # 8 unlabeled
    with pytest.raises(ValueError, match="exceeds the 8 unlabeled"):
        build_strategy(name).select(table, 9, np.random.default_rng(0))
    assert len(build_strategy(name).select(table, 8, np.random.default_rng(0))) == 8


@pytest.mark.parametrize("name", strategy_names())
@pytest.mark.parametrize("budget", [0, -1, 2.5, True])
def test_contract_bad_budget(name: str, budget: object) -> None:
    with pytest.raises(ValueError, match="budget"):
        build_strategy(name).select(score_table(), budget, np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", strategy_names())
def test_contract_deterministic_given_rng(name: str) -> None:
    table = score_table()
    a = build_strategy(name).select(table, 7, np.random.default_rng(3))
    b = build_strategy(name).select(table.sample(frac=1, random_state=4), 7, np.random.default_rng(3))
    assert a == b  # row order of the table does not matter


@pytest.mark.parametrize("name", [n for n in strategy_names() if strategies.strategy_class(n).required_columns])
def test_contract_missing_column_names_it(name: str) -> None:
    needed = strategies.strategy_class(name).required_columns
    table = score_table().drop(columns=list(needed))
    with pytest.raises(ValueError, match=needed[0]):
        build_strategy(name).select(table, 3, np.random.default_rng(0))


def test_uncertainty_strategies_pick_the_most_uncertain() -> None:
    table = pd.DataFrame({
        "sample_id": ["a", "b", "c", "d", "e"],
        "labeled": [False, False, True, False, False],
        columns.ENTROPY_MEAN: [0.1, 0.9, 5.0, 0.5, np.nan],
        columns.MARGIN_MEAN: [0.8, 0.05, 0.0, 0.3, 0.2],
        columns.LEAST_CONFIDENCE_MEAN: [0.1, 0.6, 0.9, 0.7, 0.0],
    })
    rng = np.random.default_rng(0)
    # c is labeled and e has no score (NaN goes last).
    assert build_strategy("entropy").select(table, 3, rng) == ["b", "d", "a"]
    assert build_strategy("entropy").select(table, 4, rng)[-1] == "e"
    assert build_strategy("margin").select(table, 2, rng) == ["b", "e"]
    assert build_strategy("least_confidence").select(table, 2, rng) == ["d", "b"]


def test_random_is_uniform_over_candidates() -> None:
    table = score_table(n=20, labeled_every=1000)
    table.loc[0, "labeled"] = True
    counts = pd.Series(0, index=table.sample_id)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        counts[build_strategy("random").select(table, 5, rng)] += 1
    assert counts.iloc[0] == 0
    expected = 2000 * 5 / 19
    assert (counts.iloc[1:] - expected).abs().max() < 0.15 * expected


def test_registry_is_strict() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'entopy'; registered: .*entropy"):
        build_strategy("entopy")
    with pytest.raises(ValueError, match="already registered"):
        strategies.register_strategy("entropy")(strategies.EntropyStrategy)


def test_duplicate_ids_rejected() -> None:
    table = score_table(n=6, labeled_every=1000)
    table.loc[1, "sample_id"] = "s000"
    with pytest.raises(ValueError, match="duplicate sample_id 's000'"):
        build_strategy("entropy").select(table, 2, np.random.default_rng(0))


def test_strategies_import_neither_torch_nor_ray() -> None:
    code = "import sys, strategies; print(any(m in sys.modules for m in ('torch', 'ray', 'mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
