"""Contract and behaviour tests for every registered strategy (no torch, no Ray)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import strategies
from strategies import Requirements, build_strategy, columns, strategy_names

NUM_CLASSES = 4
EMBEDDING_DIM = 6


def score_table(n: int = 50, seed: int = 0, labeled_every: int = 5) -> pd.DataFrame:
    """Every column any strategy may declare: uncertainty, BALD, class shares, features, loss, SAM."""
    rng = np.random.default_rng(seed)
    labeled = np.array([i % labeled_every == 0 for i in range(n)])
    data: dict[str, object] = {"sample_id": [f"s{i:03d}" for i in range(n)], "labeled": labeled}
    for name in columns.UNCERTAINTY_COLUMNS:
        data[name] = rng.random(n)
    data[columns.BALD_MEAN] = rng.random(n)
    shares = rng.dirichlet(np.ones(NUM_CLASSES), n)
    true_shares = rng.dirichlet(np.ones(NUM_CLASSES), n)
    for c in range(NUM_CLASSES):
        data[columns.class_fraction_column(c)] = shares[:, c]
        data[columns.label_fraction_column(c)] = np.where(labeled, true_shares[:, c], np.nan)
    for f in range(3):
        data[columns.feature_column(f"hist{f}")] = rng.random(n)
    data[columns.TRAIN_LOSS] = np.where(labeled, rng.random(n), np.nan)
    for name in sorted(columns.SAM_COLUMNS):
        data[name] = rng.random(n)
    for c in range(NUM_CLASSES):
        data[columns.sam_class_column(c)] = np.where(rng.random(n) < 0.7, rng.random(n), np.nan)
    return pd.DataFrame(data)


def embeddings_for(table: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """float32 [N, D] aligned with the rows of ``table`` (follows a shuffled table's index)."""
    base = np.random.default_rng(seed + 100).normal(size=(int(table.index.max()) + 1, EMBEDDING_DIM))
    return base[table.index.to_numpy()].astype(np.float32)


def select(name: str, table: pd.DataFrame, budget: int, seed: int) -> list[str]:
    strategy = build_strategy(name)
    emb = embeddings_for(table) if strategy.requirements().embeddings else None
    return strategy.select(table, budget, np.random.default_rng(seed), embeddings=emb)


# -- the contract, over every registered strategy with its default options ---------------------------


@pytest.mark.parametrize("name", strategy_names())
def test_contract_exact_budget_no_labeled_no_duplicates(name: str) -> None:
    table = score_table()
    picked = select(name, table, 12, 1)
    assert len(picked) == 12
    assert len(set(picked)) == 12
    labeled = set(table.loc[table.labeled, "sample_id"])
    assert not labeled & set(picked)
    assert set(picked) <= set(table.sample_id)


@pytest.mark.parametrize("name", strategy_names())
def test_contract_budget_larger_than_pool_is_a_clear_error(name: str) -> None:
    table = score_table(n=10)  # 8 unlabeled
    with pytest.raises(ValueError, match="exceeds the 8 unlabeled"):
        select(name, table, 9, 0)
    assert sorted(select(name, table, 8, 0)) == sorted(table.loc[~table.labeled, "sample_id"])


@pytest.mark.parametrize("name", strategy_names())
@pytest.mark.parametrize("budget", [0, -1, 2.5, True])
def test_contract_bad_budget(name: str, budget: object) -> None:
    with pytest.raises(ValueError, match="budget"):
        select(name, score_table(), budget, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", strategy_names())
def test_contract_deterministic_given_rng(name: str) -> None:
    table = score_table()
    a = select(name, table, 7, 3)
    b = select(name, table.sample(frac=1, random_state=4), 7, 3)
    assert a == b  # row order of the table (and of the embeddings with it) does not matter


@pytest.mark.parametrize("name", strategy_names())
def test_contract_reads_only_what_it_declares(name: str) -> None:
    strategy = build_strategy(name)
    req = strategy.requirements()
    assert isinstance(req, Requirements)
    assert req.mc_dropout_passes >= 0
    table = score_table()
    prefixes = tuple(req.column_prefixes | req.optional_column_prefixes)
    keep = [c for c in table.columns
            if c in {"sample_id", "labeled", *req.columns} or (prefixes and c.startswith(prefixes))]
    assert select(name, table[keep], 9, 5) == select(name, table, 9, 5)


@pytest.mark.parametrize("name", strategy_names())
def test_contract_reasons_match_the_selection(name: str) -> None:
    table = score_table()
    strategy = build_strategy(name)
    emb = embeddings_for(table) if strategy.requirements().embeddings else None
    frame = strategy.select_with_reasons(table, 6, np.random.default_rng(2), embeddings=emb)
    assert list(frame.columns) == ["sample_id", "rank", "priority", "reason"]
    assert frame.sample_id.tolist() == select(name, table, 6, 2)
    assert frame["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(r, str) and r for r in frame.reason)


@pytest.mark.parametrize(
    "name", [n for n in strategy_names() if build_strategy(n).requirements().columns | build_strategy(n).requirements().column_prefixes]
)
def test_contract_missing_column_names_it(name: str) -> None:
    req = build_strategy(name).requirements()
    table = score_table()
    needed = sorted(req.columns) or [f"{sorted(req.column_prefixes)[0]}*"]
    drop = [c for c in table.columns if c in req.columns or c.startswith(tuple(req.column_prefixes))]
    with pytest.raises(ValueError, match=f"'{name}' needs score columns .*{needed[0]}"):
        select(name, table.drop(columns=drop), 3, 0)


@pytest.mark.parametrize("name", [n for n in strategy_names() if build_strategy(n).requirements().embeddings])
def test_contract_embeddings_missing_or_misaligned(name: str) -> None:
    table = score_table()
    with pytest.raises(ValueError, match=f"'{name}' needs embeddings"):
        build_strategy(name).select(table, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[N, D\] with N = 50"):
        build_strategy(name).select(table, 3, np.random.default_rng(0), embeddings=np.zeros((49, 4)))
    bad = embeddings_for(table)
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="sample_id 's007' is not finite"):
        build_strategy(name).select(table, 3, np.random.default_rng(0), embeddings=bad)


@pytest.mark.parametrize("name", strategy_names())
def test_contract_does_no_io(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"strategy '{name}' tried I/O")

    table = score_table()
    for target in ("builtins.open", "io.open", "os.open", "socket.socket"):
        monkeypatch.setattr(target, refuse)
    assert len(select(name, table, 5, 0)) == 5


@pytest.mark.parametrize("name", strategy_names())
def test_contract_unknown_option_names_strategy_and_option(name: str) -> None:
    with pytest.raises(ValueError, match=f"strategy '{name}' has no option 'bogus'; valid options: "):
        build_strategy(name, bogus=1)


# -- uncertainty strategies ---------------------------------------------------------------------------


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


@pytest.mark.parametrize("measure", columns.MEASURES)
@pytest.mark.parametrize("aggregation", columns.AGGREGATIONS)
def test_aggregation_option_reads_its_column(measure: str, aggregation: str) -> None:
    column = columns.uncertainty_column(measure, aggregation)
    strategy = build_strategy(measure, aggregation=aggregation)
    assert strategy.requirements().columns == {column}
    table = pd.DataFrame({"sample_id": ["a", "b", "c"], column: [0.2, 0.9, 0.5]})
    expected = ["a", "c"] if measure == columns.MARGIN else ["b", "c"]  # margin: lower is more uncertain
    assert strategy.select(table, 2, np.random.default_rng(0)) == expected


def test_bad_aggregation_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'entropy': option 'aggregation' must be one of mean, topk, classweighted"):
        build_strategy("entropy", aggregation="max")


def test_bald_reads_bald_mean_and_declares_mc_dropout() -> None:
    assert build_strategy("bald").requirements() == Requirements(
        columns=frozenset({columns.BALD_MEAN}), mc_dropout_passes=8
    )
    assert build_strategy("bald", mc_dropout_passes=20).requirements().mc_dropout_passes == 20
    with pytest.raises(ValueError, match="'bald': option 'mc_dropout_passes' must be >= 2"):
        build_strategy("bald", mc_dropout_passes=1)
    table = pd.DataFrame({"sample_id": ["a", "b", "c"], columns.BALD_MEAN: [0.1, 0.3, 0.2]})
    assert build_strategy("bald").select(table, 2, np.random.default_rng(0)) == ["b", "c"]


def test_reasons_show_the_column_value_and_rank() -> None:
    table = pd.DataFrame({"sample_id": ["a", "b"], columns.MARGIN_TOPK: [0.25, 0.125]})
    frame = build_strategy("margin", aggregation="topk").select_with_reasons(table, 2, np.random.default_rng(0))
    assert frame.reason.tolist() == ["margin_topk 0.125 (rank 1)", "margin_topk 0.25 (rank 2)"]
    assert frame.priority.tolist() == [-0.125, -0.25]


def test_random_is_uniform_over_candidates() -> None:
    table = score_table(n=20, labeled_every=1000)
    table.loc[0, "labeled"] = True
    counts = pd.Series(0, index=table.sample_id)
    rng = np.random.default_rng(0)
    for _ in range(400):
        counts[build_strategy("random").select(table, 8, rng)] += 1
    assert counts.iloc[0] == 0
    expected = 400 * 8 / 19  # 168, standard deviation about 10
    assert (counts.iloc[1:] - expected).abs().max() < 0.2 * expected


# -- registry and table checks -------------------------------------------------------------------------


def test_registry_is_strict() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'entopy'; registered: .*entropy"):
        build_strategy("entopy")
    with pytest.raises(ValueError, match="already registered"):
        strategies.register_strategy("entropy")(strategies.EntropyStrategy)
    with pytest.raises(ValueError, match="strategy 'random' has no option 'beta'; valid options: none"):
        build_strategy("random", beta=1)
    with pytest.raises(ValueError, match="strategy 'power' has no option 'bta'; valid options: base, beta"):
        build_strategy("power", bta=2)


def test_strategy_options_lists_defaults() -> None:
    assert strategies.strategy_options("power") == {"base": "entropy", "beta": 1.0}
    assert strategies.strategy_options("entropy") == {"aggregation": "mean"}


def test_duplicate_ids_rejected() -> None:
    table = score_table(n=6, labeled_every=1000)
    table.loc[1, "sample_id"] = "s000"
    with pytest.raises(ValueError, match="duplicate sample_id 's000'"):
        build_strategy("entropy").select(table, 2, np.random.default_rng(0))


def test_strategies_import_neither_torch_nor_ray() -> None:
    code = "import sys, strategies; print(any(m in sys.modules for m in ('torch', 'ray', 'mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- ties: a seeded draw, never the alphabet ----------------------------------------------------------


def tied_table(n: int = 60) -> pd.DataFrame:
    """What an untrained or collapsed model gives: every image scored the same (100% background)."""
    table = score_table(n, labeled_every=n + 1)
    for name in table.columns:
        if name not in ("sample_id", "labeled") and pd.api.types.is_float_dtype(table[name]):
            table[name] = 0.5
    for c in range(NUM_CLASSES):
        table[columns.class_fraction_column(c)] = 1.0 if c == 0 else 0.0
    return table


def select_tied(name: str, table: pd.DataFrame, budget: int, seed: int) -> list[str]:
    strategy = build_strategy(name)
    emb = np.ones((len(table), EMBEDDING_DIM), np.float32) if strategy.requirements().embeddings else None
    return strategy.select(table, budget, np.random.default_rng(seed), embeddings=emb)


@pytest.mark.parametrize("name", strategy_names())
def test_ties_fall_to_a_seeded_draw_not_to_the_first_ids(name: str) -> None:
    table = tied_table()
    first = sorted(table.sample_id)[:10]
    picks = [select_tied(name, table, 10, seed) for seed in range(4)]
    assert all(p == select_tied(name, table, 10, seed) for seed, p in enumerate(picks))  # the same for a seed
    shuffled = table.sample(frac=1.0, random_state=3)
    assert select_tied(name, shuffled, 10, 2) == picks[2]  # whatever the table's row order
    assert sum(sorted(p) == first for p in picks) == 0, f"{name} took the alphabetically first ids"
    assert len({tuple(sorted(p)) for p in picks}) > 1  # other seeds, other draws


def test_region_ties_fall_to_a_seeded_draw() -> None:
    rows = pd.DataFrame({"sample_id": np.repeat([f"img{i:02d}" for i in range(10)], 5),
                         "region_id": np.tile(np.arange(5), 10), "cost_clicks": 1.0,
                         strategies.region_columns.ENTROPY_MEAN: 0.3})
    strategy = strategies.build_region_strategy("region_uncertainty")
    picks = [strategy.select(rows, 8, np.random.default_rng(seed)) for seed in range(3)]
    first = rows.iloc[:8][["sample_id", "region_id"]].to_numpy().tolist()
    assert all(p[["sample_id", "region_id"]].to_numpy().tolist() != first for p in picks)
    again = strategy.select(rows.sample(frac=1.0, random_state=1), 8, np.random.default_rng(1))
    assert again.equals(picks[1])
