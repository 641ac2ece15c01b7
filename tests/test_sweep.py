"""Ray Tune sweeps: the sweep config and its checks, then a small training sweep (ASHA, trials as
MLflow runs, the best config as a YAML the loop takes) and a small active-learning sweep (whole
simulated experiments compared by the area under their learning curves)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from orchestrator import config_from_dict, load_config
from orchestrator._cli import main
from orchestrator._sweep import (
    SweepResult,
    _overrides,
    apply_overrides,
    check_sweep,
    load_sweep_config,
    run_sweeps,
    sweep_config_from_dict,
)
from workers import learning_curve_auc

from .conftest import ROOT, tiny_config

# ------------------------------------------------------------------------------------ config


def test_the_shipped_sweep_config_loads_and_names_valid_keys() -> None:
    sweep, base = load_sweep_config(ROOT / "configs/sweep.yaml")
    assert base.experiment.name == "quickstart" and base.train.num_workers == 0
    assert set(sweep.train.search_space) >= {"train.lr", "train.weight_decay", "train.loss.name", "train.epochs"}
    assert {"loop", "loop.budget"} <= set(sweep.active_learning.search_space)
    sweep, base = load_sweep_config(ROOT / "configs/sweep.yaml", ["train.num_samples=2", "overrides.train.epochs=3"])
    assert sweep.train.num_samples == 2 and base.train.epochs == 3 and base.train.num_workers == 0


@pytest.mark.parametrize(("override", "message"), [
    ("train.search_space={train.epoch: 3}", "unknown config key 'train.epoch'"),
    ("train.search_space={train.lr: {loguniform: [0, 1]}}", "loguniform needs low <= high and low > 0"),
    ("train.search_space={train.loss.name: {choice: [ce, hinge]}}", "'hinge' is not one of"),
    ("active_learning.search_space={loop.strategy: {grid: [random, entopy]}}", "unknown strategy 'entopy'"),
    ("active_learning.search_space={loop: {grid: [{strategy: random, strategy_options: {members: {entropy: 1}}}]}}",
     "strategy 'random' has no option 'members'"),
    ("active_learning.search_space={experiment.name: x}", "the sweep sets experiment.name"),
    ("train.num_sample=3", "unknown config key 'train.num_sample'"),
])
def test_bad_search_spaces_are_refused_before_anything_runs(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_sweep_config(ROOT / "configs/sweep.yaml", [override])


def test_the_cli_reports_a_bad_sweep_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "configs/quickstart.yaml"),
                                    "train": {"search_space": {"train.epoch": 3}}}))
    assert main(["sweep", "--config", str(path)]) == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err


def test_trial_values_become_overrides_that_read_back_exactly() -> None:
    values = {"train.weight_decay": 1e-6, "train.loss.name": "ce_dice", "loop": {"strategy": "fusion",
              "strategy_options": {"members": {"entropy": 0.7, "class_balance": 0.3}}}}
    assert _overrides(values)[0] == "train.weight_decay=1.0e-06"  # JSON's 1e-06 is a string to YAML
    cfg = apply_overrides(config_from_dict(tiny_config()), values)
    assert cfg.train.weight_decay == 1e-6 and cfg.train.loss.name == "ce_dice"
    assert cfg.train.epochs == 2  # the rest of the section is kept
    assert cfg.loop.strategy == "fusion" and cfg.loop.strategy_options["members"]["class_balance"] == 0.3


# ------------------------------------------------------------------------------------ sweeps on Ray


@pytest.fixture(scope="module")
def sweeps(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SweepResult]]:
    root = tmp_path_factory.mktemp("sweep")
    base = config_from_dict(tiny_config(loop={"rounds": 2}))
    sweep = sweep_config_from_dict({
        "name": "tiny", "max_concurrent_trials": 1,
        "train": {"num_samples": 3, "grace_period": 1, "cpus_per_trial": 1,
                  "search_space": {"train.lr": {"loguniform": [0.001, 0.02]}, "train.epochs": 3,
                                   "train.loss.name": {"choice": ["ce", "ce_dice"]}}},
        "active_learning": {"cpus_per_trial": 0.5, "search_space": {
            "loop.strategy": {"grid": ["random", "entropy"]}, "score.cpus_per_actor": 0.5}},
    })
    check_sweep(sweep, base)
    return root, run_sweeps(sweep, base, workdir=root)


@pytest.mark.ray
def test_training_sweep_picks_the_best_trial_and_writes_a_config_the_loop_takes(sweeps) -> None:
    root, results = sweeps
    train = results[0]
    assert train.kind == "train" and train.metric == "val_miou"
    trials = train.trials
    assert len(trials) == 3 and (trials.status == "ok").all()
    assert trials.iterations.between(1, 3).all()  # one report per epoch; ASHA may stop a trial early
    assert train.best_value == trials.val_miou.max()
    assert set(train.best_overrides) == {"train.lr", "train.epochs", "train.loss.name"}
    best = load_config(train.best_config_path)
    assert best == train.best_config
    assert best.train.lr == pytest.approx(train.best_overrides["train.lr"])
    assert best.train.loss.name == train.best_overrides["train.loss.name"]
    assert best.loop == config_from_dict(tiny_config(loop={"rounds": 2})).loop  # only the searched keys change
    assert pd.read_csv(root / "trials_train.csv").trial_id.tolist() == trials.trial_id.tolist()


@pytest.mark.ray
def test_training_trials_are_mlflow_runs_under_the_sweep_run(sweeps) -> None:
    from mlflow.tracking import MlflowClient

    root, results = sweeps
    train = results[0]
    client = MlflowClient(tracking_uri=train.tracking_uri)
    assert train.tracking_uri == f"sqlite:///{root / 'mlflow.db'}"
    exp = client.get_experiment_by_name("tiny-train")
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == train.summary_run_id]
    assert len(trials) == 3 and len(runs) == 4
    for r in trials:
        assert {"train.lr", "train.loss.name"} <= set(r.data.params)
        history = client.get_metric_history(r.info.run_id, "val_miou")
        assert 1 <= len(history) <= 3
    summary = client.get_run(train.summary_run_id)
    assert summary.data.metrics["best_val_miou"] == pytest.approx(train.best_value)
    assert {a.path for a in client.list_artifacts(train.summary_run_id)} == {"best_train.yaml", "trials_train.csv"}


@pytest.mark.ray
def test_active_learning_sweep_compares_whole_experiments_by_learning_curve_area(sweeps) -> None:
    from mlflow.tracking import MlflowClient

    root, results = sweeps
    al = results[1]
    assert al.kind == "active_learning" and al.metric == "learning_curve_auc"
    trials = al.trials.set_index("loop.strategy")
    assert sorted(trials.index) == ["entropy", "random"] and (trials.iterations == 2).all()
    best = load_config(al.best_config_path)
    assert best.loop.strategy == al.best_overrides["loop.strategy"] == al.trials["loop.strategy"][0]
    assert best.experiment.name == "tiny" and best.tracking.tracking_uri is None  # trial-only keys left out

    client = MlflowClient(tracking_uri=al.tracking_uri)
    exp = client.get_experiment_by_name("tiny-active-learning")
    experiments = client.search_runs([exp.experiment_id], filter_string="tags.`shoal.run_kind` = 'experiment'")
    assert len(experiments) == 2
    for run in experiments:
        assert run.data.tags["mlflow.parentRunId"] == al.summary_run_id  # nested under the sweep run
        curve = client.get_metric_history(run.info.run_id, "val_miou")
        counts = client.get_metric_history(run.info.run_id, "trained_on")
        auc = learning_curve_auc([m.value for m in sorted(counts, key=lambda m: m.step)],
                                 [m.value for m in sorted(curve, key=lambda m: m.step)])
        assert trials.loc[run.data.tags["shoal.strategy"], "learning_curve_auc"] == pytest.approx(auc)
        rounds = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert len(rounds) == 2
        if run.data.tags["shoal.strategy"] == "entropy":  # the random trial ran first: its baseline
            random_run = next(r for r in experiments if r.data.tags["shoal.strategy"] == "random")
            assert {r.data.tags.get("shoal.baseline_run_id") for r in rounds} == {random_run.info.run_id}
    assert (root / "trials" / al.trials.trial_id[0]).is_dir()
    artifacts = {a.path for a in client.list_artifacts(al.summary_run_id)}
    assert artifacts == {"best_active_learning.yaml", "trials_active_learning.csv", "learning_curves_active_learning.png"}
