"""The loop gives every strategy what it declares: embeddings, labeled rows as context, class-weighted
columns, cold-start features; it applies reweighting policies and stopping criteria."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import workers
from orchestrator import ActiveLearningLoop, TableStore, config_from_dict
from strategies import build_strategy, columns

from .conftest import tiny_config

pytestmark = pytest.mark.ray


def _loop(tmp_path: Path, name: str, **sections: dict) -> ActiveLearningLoop:
    return ActiveLearningLoop(config_from_dict(tiny_config(**sections)), tmp_path / name)


FUSION = {"members": {
    "coreset": 1.0,
    "entropy": {"weight": 1.0, "aggregation": "classweighted"},
    "class_balance": 1.0,
}}


def test_fusion_of_coreset_classweighted_entropy_and_class_balance_gets_what_it_declares(tmp_path: Path, ray_cluster: None) -> None:
    loop = _loop(tmp_path, "fusion", loop={"strategy": "fusion", "strategy_options": FUSION, "rounds": 1})
    loop.step()
    state = loop.state
    assert state is not None
    info = state.history[-1]
    round_dir = tmp_path / "fusion" / "rounds" / "round-001"
    table = TableStore(tmp_path / "fusion" / "table").read(info["revision"])
    train = table[table.split == "train"].reset_index(drop=True)
    # Class-weighted columns exist for the pool and weigh pixels differently from the plain mean.
    pool = train[~train.sample_id.isin(info["added"]) & ~train.labeled]
    assert pool[columns.ENTROPY_CLASSWEIGHTED].notna().all()
    assert (pool[columns.ENTROPY_CLASSWEIGHTED] != pool[columns.ENTROPY_MEAN]).any()
    # Labeled rows carry their true class shares, which sum to 1 per image.
    labeled_before = train[train.labeled & (train.round_labeled == 0)]
    fractions = labeled_before[[columns.label_fraction_column(c) for c in range(len(workers.SYNTHETIC_CLASSES.names))]]
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0, atol=1e-9)
    # The selection is what the strategy picks from the train rows (labeled ones as context) and
    # the embeddings the scorer wrote for all of them.
    context = train[[c for c in train.columns if c not in ("image_path", "mask_path", "split", "weight", "round_labeled")]].copy()
    context["labeled"] = train.round_labeled == 0
    embeddings = workers.read_embeddings(str(round_dir / "embeddings"), context.sample_id.tolist())
    assert embeddings.shape[0] == len(context) and np.isfinite(embeddings).all()
    rng = np.random.default_rng([0, 1, 1])
    again = build_strategy("fusion", **FUSION).select(context, 6, rng, embeddings)
    assert again == list(info["added"])
    with pytest.raises(ValueError, match="needs embeddings"):
        build_strategy("fusion", **FUSION).select(context, 6, rng)


def test_cold_start_spreads_the_initial_set_over_colour_features(tmp_path: Path, ray_cluster: None) -> None:
    cold = _loop(tmp_path, "cold", loop={"initial_strategy": "cold_start", "rounds": 1})
    state = cold.start()
    table = cold.store.read(state.revision)
    train = table[table.split == "train"]
    feats = list(workers.FEATURE_COLUMNS)
    assert train[feats].notna().all().all()
    initial = set(train.loc[train.labeled, "sample_id"])
    assert len(initial) == 8
    expected = build_strategy("cold_start").select(
        train[["sample_id", *feats]].assign(labeled=False), 8, np.random.default_rng([0, 0]))
    assert initial == set(expected)
    # Spread out: the picks' mean distance to their nearest other pick beats a random set's.
    z = (train[feats] - train[feats].mean()) / train[feats].std().replace(0, 1)
    z = z.to_numpy()

    def spread(mask: np.ndarray) -> float:
        x = z[mask]
        d = np.linalg.norm(x[:, None] - x[None], axis=-1) + np.eye(len(x)) * 1e9
        return float(d.min(1).mean())

    picked = train.labeled.to_numpy()
    rng = np.random.default_rng(1)
    random_spreads = []
    for _ in range(20):
        mask = np.zeros(len(train), dtype=bool)
        mask[rng.choice(len(train), 8, replace=False)] = True
        random_spreads.append(spread(mask))
    assert spread(picked) > np.mean(random_spreads)


def test_loss_reweighting_with_an_override_file_and_a_plateau_stop(tmp_path: Path, ray_cluster: None) -> None:
    override = tmp_path / "weights.csv"
    first = _loop(tmp_path, "probe", loop={"rounds": 1})
    state = first.start()
    ids = sorted(first.store.read(state.revision).query("labeled").sample_id)
    pd.DataFrame({"sample_id": [ids[0], ids[1]], "weight": [0.0, 3.0]}).to_csv(override, index=False)
    loop = _loop(tmp_path, "reweight", loop={
        "rounds": 4, "reweighting": {"policy": "loss", "options": {"max_ratio": 4.0}, "override_file": str(override)},
        "stopping": {"plateau_rounds": 1, "min_delta": 1.0},
    })
    loop.run()
    assert loop.stop_reason is not None and "plateau" in loop.stop_reason
    assert len(loop.history) == 2  # round 2's best is never 1.0 mIoU above round 1's
    rounds = tmp_path / "reweight" / "rounds"
    w1 = pd.read_csv(rounds / "round-001" / "train_weights.csv").set_index("sample_id").weight
    w2 = pd.read_csv(rounds / "round-002" / "train_weights.csv").set_index("sample_id").weight
    # Round 1: uniform policy, then the overrides; round 2: the loss policy.
    assert w1[ids[0]] == 0.0 and w1[ids[1]] == 3.0
    assert set(w1.drop([ids[0], ids[1]])) == {1.0}
    others = w2.drop([ids[0], ids[1]])
    assert others.nunique() > 1 and others.max() / others.min() <= 4.0 + 1e-9
    # Samples with larger loss under round 1's model weigh more in round 2.
    signals = pd.read_parquet(rounds / "round-001" / "train_signals.parquet").set_index("sample_id").train_loss
    common = others.index.intersection(signals.index)
    assert np.corrcoef(signals[common], others[common])[0, 1] > 0.5
    # A zero weight keeps the sample labeled but out of training.
    trained = set(pd.read_parquet(rounds / "round-002" / "train_signals.parquet").sample_id)
    assert ids[0] not in trained and ids[1] in trained
    metrics = loop.history[-1].metrics
    assert metrics["train_weight_zero"] == 1.0 and metrics["train_weight_max"] == 3.0


def test_total_budget_stops_the_loop(tmp_path: Path, ray_cluster: None) -> None:
    loop = _loop(tmp_path, "budget", loop={"rounds": 5, "stopping": {"total_budget": 14}})
    loop.run()
    assert len(loop.history) == 1 and "budget spent" in str(loop.stop_reason)
