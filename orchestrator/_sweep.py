"""Ray Tune sweeps over an experiment config (``shoal sweep --config configs/sweep.yaml``).

Two sweeps, each optional:

``train``
    Training hyperparameters (``train.lr``, ``train.loss.name``, ...) on one fixed labeled set, the
    base config's initial random set or the latest labeled set of an earlier experiment. A trial is
    a plain function that runs the training worker's per-worker loop (``workers.train_loop``) in
    its own process and reports the validation metrics every epoch, so the ASHA scheduler stops
    poor trials early. Selection: the best epoch's val mIoU.
``active_learning``
    Active-learning settings (``loop.strategy``, ``loop.budget``, strategy options) over simulated
    rounds: a trial runs a whole :class:`ActiveLearningLoop` with the simulated oracle in its own
    work dir and reports after every round. Selection: the normalised area under the learning
    curve (val mIoU against the labeled count, ``workers.learning_curve_auc``).

Every trial is an MLflow run in the sweep's tracking store (``<sweep dir>/mlflow.db`` unless
``tracking_uri`` is set), nested under one summary run per sweep that holds the trial table and the
best config. The best config is written as a complete experiment config,
``<sweep dir>/best_<sweep>.yaml``, that ``shoal run --config`` takes as it is.

A search space maps dotted config keys to a fixed value or to one sampler:
``{grid: [a, b]}`` (every value, crossed with the other grids), ``{choice: [a, b]}``,
``{uniform: [low, high]}``, ``{loguniform: [low, high]}`` or ``{randint: [low, high]}`` (both
ends included). ``num_samples`` draws that many trials per grid point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import workers
from strategies import build_strategy

from ._atomic import atomic_write, atomic_write_text
from ._config import Config, _build, _parse_override, config_from_dict, load_config
from ._table import IMAGE_PATH, LABELED, MASK_PATH, SAMPLE_ID, SPLIT, TRAIN_SPLIT, VAL_SPLIT, WEIGHT, TableStore
from ._train import train_spec

log = logging.getLogger(__name__)

SWEEP_KINDS = ("train", "active_learning")
SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
TRAIN_METRIC = "val_miou"
AL_METRIC = "learning_curve_auc"
# Keys a sweep sets on every active-learning trial itself; a search space must leave them alone.
_TRIAL_KEYS = ("experiment.name", "tracking.tracking_uri", "tracking.experiment_name")


@dataclass(frozen=True)
class TrainSweepConfig:
    """Training hyperparameters on a fixed labeled set, with ASHA early stopping."""

    enabled: bool = True
    num_samples: int = 4
    """Trials drawn from the search space (per grid point)."""
    search_space: dict[str, Any] = field(default_factory=dict)
    labeled_from: str | None = None
    """Work dir of an earlier experiment whose latest labeled set is the training set; None = the
    base config's initial random set (``loop.initial_labeled`` samples, ``experiment.seed``)."""
    grace_period: int = 2
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    cpus_per_trial: float = 1.0
    """CPUs reserved per trial; its torch threads follow (at least 1)."""


@dataclass(frozen=True)
class ActiveLearningSweepConfig:
    """Active-learning settings compared over simulated rounds by the area under the learning curve."""

    enabled: bool = True
    num_samples: int = 1
    search_space: dict[str, Any] = field(default_factory=dict)
    cpus_per_trial: float = 0.5
    """CPUs reserved per trial (the loop's driver). Training workers and scoring actors the loop
    starts ask for their own CPUs, so leave room for them: fractions are allowed."""


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    base: str = "quickstart.yaml"
    """The experiment config the sweeps vary, relative to the sweep file's folder."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys set on the base before sweeping (e.g. smaller data for a quick sweep)."""
    workdir: str | None = None
    """Where the sweep keeps everything; None = ``runs/sweeps/<name>``."""
    tracking_uri: str | None = None
    """None = a SQLite store in the sweep dir (``<workdir>/mlflow.db``)."""
    max_concurrent_trials: int = 1
    seed: int = 0
    """Seed of the search's random draws (the trials' own seed is ``experiment.seed``)."""
    train: TrainSweepConfig = field(default_factory=TrainSweepConfig)
    active_learning: ActiveLearningSweepConfig = field(default_factory=ActiveLearningSweepConfig)


@dataclass
class SweepResult:
    """The outcome of one sweep: the winning overrides, the config they make and every trial."""

    kind: str
    metric: str
    best_value: float
    best_overrides: dict[str, Any]
    best_config: Config
    best_config_path: Path
    trials: pd.DataFrame
    """One row per trial: ``trial_id``, the searched keys, the metric, ``status``."""
    experiment_name: str
    summary_run_id: str
    tracking_uri: str


# ---------------------------------------------------------------------------------------- config


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[SweepConfig, Config]:
    """The sweep file at ``path`` (``KEY=VALUE`` overrides apply to it) and the base experiment
    config it names, with the sweep's ``overrides`` applied. Search spaces are checked: every key
    must be a config key and every listed value valid for it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping")
    try:
        sweep = sweep_config_from_dict(data, overrides)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    base_path = Path(sweep.base) if Path(sweep.base).is_absolute() else path.parent / sweep.base
    base = load_config(base_path, _overrides(sweep.overrides))
    check_sweep(sweep, base)
    return sweep, base


def sweep_config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> SweepConfig:
    """A :class:`SweepConfig` from a mapping plus ``KEY=VALUE`` overrides; unknown keys raise."""
    merged = json.loads(json.dumps(dict(data)))
    for item in overrides:
        keys, value = _parse_override(item)
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    sweep: SweepConfig = _build(SweepConfig, merged)
    return sweep


def check_sweep(sweep: SweepConfig, base: Config) -> None:
    """Raise ValueError naming the key when a search space could build an invalid config."""
    if sweep.max_concurrent_trials < 1:
        raise ValueError(f"max_concurrent_trials: must be >= 1, got {sweep.max_concurrent_trials}")
    for kind in SWEEP_KINDS:
        section = getattr(sweep, kind)
        if not section.enabled:
            continue
        if section.num_samples < 1:
            raise ValueError(f"{kind}.num_samples: must be >= 1, got {section.num_samples}")
        if section.cpus_per_trial <= 0:
            raise ValueError(f"{kind}.cpus_per_trial: must be positive, got {section.cpus_per_trial}")
        for key, spec in section.search_space.items():
            where = f"{kind}.search_space.{key}"
            if kind == "active_learning" and key in _TRIAL_KEYS:
                raise ValueError(f"{where}: the sweep sets {key} on every trial itself")
            for value in _representatives(spec, where):
                try:
                    cfg = config_from_dict(base.to_dict(), _overrides({key: value}))
                    build_strategy(cfg.loop.strategy, **cfg.loop.strategy_options)
                except ValueError as exc:
                    raise ValueError(f"{where}: value {value!r} makes an invalid config: {exc}") from None
    if sweep.train.enabled and (sweep.train.grace_period < 1 or sweep.train.reduction_factor < 2):
        raise ValueError("train.grace_period must be >= 1 and train.reduction_factor >= 2")


def _sampler(spec: Any) -> tuple[str, Any] | None:
    if isinstance(spec, Mapping) and len(spec) == 1:
        kind, args = next(iter(spec.items()))
        if kind in SAMPLERS:
            return str(kind), args
    return None


def _representatives(spec: Any, where: str) -> list[Any]:
    """Values of a search-space entry to validate: every listed one, the ends of a range."""
    sampler = _sampler(spec)
    if sampler is None:
        return [spec]
    kind, args = sampler
    if not isinstance(args, list) or not args:
        raise ValueError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("grid", "choice"):
        return list(args)
    if len(args) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
        raise ValueError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low <= high or (kind == "loguniform" and low <= 0):
        raise ValueError(f"{where}: {kind} needs low <= high{' and low > 0' if kind == 'loguniform' else ''}, got {args!r}")
    if kind == "randint" and not all(isinstance(v, int) for v in args):
        raise ValueError(f"{where}: randint needs integers, got {args!r}")
    return [low, high]


def _domain(spec: Any) -> Any:
    """A search-space entry as a Ray Tune domain (or the fixed value)."""
    from ray import tune

    sampler = _sampler(spec)
    if sampler is None:
        return spec
    kind, args = sampler
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    return tune.randint(args[0], args[1] + 1)  # Tune's upper end is exclusive


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    return value


def _overrides(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"train.lr": 0.001}`` as ``KEY=VALUE`` overrides (values as YAML, which the parser reads).
    Mapping values are set key by key (``{"train": {"epochs": 3}}`` sets ``train.epochs`` only),
    so an override never resets the rest of a section."""
    out = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += _overrides(v, f"{key}.")
        else:
            out.append(f"{key}={_yaml_scalar(_plain(v))}")
    return out


def _yaml_scalar(value: Any) -> str:
    """``value`` as the YAML text that reads back as it (JSON would write 1e-06, a string to YAML)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


def apply_overrides(base: Config, values: Mapping[str, Any]) -> Config:
    return config_from_dict(base.to_dict(), _overrides(values))


# ---------------------------------------------------------------------------------------- driver


def sweep_dir(sweep: SweepConfig) -> Path:
    return Path(sweep.workdir or Path("runs") / "sweeps" / sweep.name).resolve()


def run_sweeps(
    sweep: SweepConfig,
    base: Config,
    *,
    only: Sequence[str] | None = None,
    workdir: str | Path | None = None,
    verbose: int = 0,
    on_result: Callable[[SweepResult], None] | None = None,
) -> list[SweepResult]:
    """Run the enabled sweeps (or those in ``only``) on the Ray cluster of ``base.ray`` (or the one
    already initialised) and return their results in the order train, active_learning."""
    kinds = [k for k in SWEEP_KINDS if (only is None and getattr(sweep, k).enabled) or (only and k in only)]
    if only:
        unknown = sorted(set(only) - set(SWEEP_KINDS))
        if unknown:
            raise ValueError(f"unknown sweep {unknown[0]!r}; valid: {', '.join(SWEEP_KINDS)}")
    if not kinds:
        raise ValueError("no sweep to run: enable train or active_learning in the sweep config")
    root = Path(workdir).resolve() if workdir else sweep_dir(sweep)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "sweep.yaml", yaml.safe_dump(_to_plain_dict(sweep), sort_keys=False))
    atomic_write_text(root / "base.yaml", yaml.safe_dump(base.to_dict(), sort_keys=False))
    workers.ensure_ray(base.ray.address, base.ray.num_cpus, base.ray.log_to_driver)
    results = []
    for kind in kinds:
        run = _run_train_sweep if kind == "train" else _run_active_learning_sweep
        result = run(sweep, base, root, verbose)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _to_plain_dict(sweep: SweepConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(sweep)))


def _tracking(sweep: SweepConfig, root: Path, experiment: str) -> workers.Tracker:
    uri = sweep.tracking_uri or workers.default_tracking_uri(root)
    local = sweep.tracking_uri is None
    return workers.Tracker(uri, experiment, artifact_location=(root / "mlartifacts").as_uri() if local else None)


def _summary_run(tracker: workers.Tracker, sweep: SweepConfig, kind: str, space: Mapping[str, Any]) -> str:
    run = tracker.client.create_run(
        tracker.experiment_id, run_name=f"{sweep.name}: {kind} sweep",
        tags={"shoal.run_kind": "sweep", "shoal.sweep": sweep.name, "shoal.sweep_kind": kind,
              **workers.source_tags()},
    )
    run_id = str(run.info.run_id)
    tracker.log(run_id, params={f"search.{k}": json.dumps(v) for k, v in space.items()})
    return run_id


def _tune_run(
    kind: str,
    trainable: Any,
    space: Mapping[str, Any],
    *,
    sweep: SweepConfig,
    num_samples: int,
    metric: str,
    root: Path,
    callbacks: list[Any],
    scheduler: Any = None,
    verbose: int = 0,
) -> Any:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tuner = tune.Tuner(
        trainable,
        param_space={k: _domain(v) for k, v in space.items()},
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=num_samples, scheduler=scheduler,
            # Tune ignores max_concurrent_trials beside a search algorithm instance: give it here.
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials),
        ),
        run_config=tune.RunConfig(
            name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(root / "tune"),
            callbacks=callbacks, verbose=verbose,
        ),
    )
    return tuner.fit()


def _trials_table(results: Any, keys: Sequence[str], metric: str, scope: str) -> pd.DataFrame:
    rows = []
    for r in results:
        frame = r.metrics_dataframe
        value = float("nan")
        if frame is not None and metric in frame:
            series = frame[metric].dropna()
            if len(series):
                value = float(series.max() if scope == "all" else series.iloc[-1])
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id", Path(r.path).name),
            **{k: _plain(r.config.get(k)) for k in keys},
            metric: value,
            "iterations": int((r.metrics or {}).get("training_iteration", 0)),
            "status": "error" if r.error else "ok",
        })
    return pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last", ignore_index=True)


def _finish_sweep(
    kind: str,
    metric: str,
    results: Any,
    scope: str,
    *,
    sweep: SweepConfig,
    base: Config,
    root: Path,
    tracker: workers.Tracker,
    summary: str,
    space: Mapping[str, Any],
) -> SweepResult:
    trials = _trials_table(results, list(space), metric, scope)
    trials_file = root / f"trials_{kind}.csv"
    atomic_write(trials_file, lambda p: trials.to_csv(p, index=False))
    ok = trials[trials[metric].notna()]
    if ok.empty:
        tracker.finish(summary, "FAILED")
        errors = [str(r.error) for r in results if r.error][:1]
        raise RuntimeError(f"{kind} sweep: no trial reported {metric}" + (f"; first error: {errors[0]}" if errors else ""))
    best_row = ok.iloc[0]
    best_overrides = {k: _plain(best_row[k]) for k in space}
    best = apply_overrides(base, best_overrides)
    best_path = root / f"best_{kind}.yaml"
    header = (f"# Best config of the {kind} sweep '{sweep.name}' ({metric} {best_row[metric]:.4f}, trial "
              f"{best_row['trial_id']}): the base config with\n"
              + "".join(f"#   {k}: {json.dumps(v)}\n" for k, v in best_overrides.items())
              + f"# Use it with: shoal run --config {best_path}\n")
    atomic_write_text(best_path, header + yaml.safe_dump(best.to_dict(), sort_keys=False))
    tracker.log(summary, params={f"best.{k}": v for k, v in best_overrides.items()},
                metrics={f"best_{metric}": float(best_row[metric]), "trials": float(len(trials))})
    tracker.log_artifacts(summary, [best_path, trials_file])
    tracker.finish(summary)
    return SweepResult(
        kind=kind, metric=metric, best_value=float(best_row[metric]), best_overrides=best_overrides,
        best_config=best, best_config_path=best_path, trials=trials, experiment_name=tracker.experiment_name,
        summary_run_id=summary, tracking_uri=tracker.tracking_uri,
    )


# ------------------------------------------------------------------------------- (a) training sweep


def _run_train_sweep(sweep: SweepConfig, base: Config, root: Path, verbose: int) -> SweepResult:
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    cfg = sweep.train
    fixed = fixed_labeled_set(base, root, cfg.labeled_from)
    space = dict(cfg.search_space)
    epochs = [v for v in _representatives(space.get("train.epochs", base.train.epochs), "train.epochs")]
    tracker = _tracking(sweep, root, f"{sweep.name}-train")
    summary = _summary_run(tracker, sweep, "train", space)
    tracker.log(summary, params={"labeled_count": len(fixed["train_images"]), "labeled_from": cfg.labeled_from or "initial"})
    scheduler = ASHAScheduler(
        time_attr="training_iteration", max_t=int(max(epochs)), grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor,
    )
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base.to_dict(), fixed=fixed, threads=max(1, int(cfg.cpus_per_trial))),
        {"cpu": cfg.cpus_per_trial},
    )
    callback = MLflowLoggerCallback(
        tracking_uri=tracker.tracking_uri, experiment_name=tracker.experiment_name,
        tags={"mlflow.parentRunId": summary, "shoal.run_kind": "trial", "shoal.sweep": sweep.name,
              **workers.source_tags()},
    )
    results = _tune_run("train", trainable, space, sweep=sweep, num_samples=cfg.num_samples, metric=TRAIN_METRIC,
                        root=root, callbacks=[callback], scheduler=scheduler, verbose=verbose)
    return _finish_sweep("train", TRAIN_METRIC, results, "all", sweep=sweep, base=base, root=root,
                         tracker=tracker, summary=summary, space=space)


def fixed_labeled_set(base: Config, root: Path, labeled_from: str | None) -> dict[str, Any]:
    """The training sweep's data: the labeled train samples and the validation samples, as paths.

    ``labeled_from`` names an experiment's work dir (its latest revision's labeled set); None makes
    the base config's initial random set, in ``<root>/labeled-<config hash>`` (the table build of a
    fresh experiment, without running a round).
    """
    from . import ActiveLearningLoop

    if labeled_from is not None:
        loop = ActiveLearningLoop.resume(labeled_from)
    else:
        digest = hashlib.sha256(json.dumps(base.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        loop = ActiveLearningLoop(base, root / f"labeled-{digest}")
    state = loop.start()  # builds the table and the initial labeled set only
    df = TableStore(loop.workdir / "table").read(state.revision)
    classes = json.loads((loop.workdir / "classes.json").read_text())
    labeled = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED] & (df[WEIGHT] > 0)]
    val = df[df[SPLIT] == VAL_SPLIT]
    return {
        "class_names": list(classes["classes"]), "ignore_index": int(classes["ignore_index"]),
        "train_ids": labeled[SAMPLE_ID].tolist(), "train_images": labeled[IMAGE_PATH].tolist(),
        "train_masks": labeled[MASK_PATH].tolist(), "train_weights": labeled[WEIGHT].astype(float).tolist(),
        "val_ids": val[SAMPLE_ID].tolist(), "val_images": val[IMAGE_PATH].tolist(), "val_masks": val[MASK_PATH].tolist(),
        "revision": state.revision, "workdir": str(loop.workdir),
    }


def train_trial(config: dict[str, Any], base: dict[str, Any], fixed: dict[str, Any], threads: int = 1) -> None:
    """One training trial: the base config with the trial's values, trained on the fixed set in this
    process with ``threads`` torch threads, reporting the validation metrics of every epoch to Tune."""
    import torch
    from ray import tune

    cfg = config_from_dict(base, _overrides(config))
    torch.set_num_threads(threads)
    out = Path(tune.get_context().get_trial_dir()) / "model"
    # Round 1's seed: trials differ by their hyperparameters only.
    spec = train_spec(cfg, fixed, str(out), seed=cfg.experiment.seed * 1000 + 1)

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        tune.report({k: float(v) for k, v in metrics.items() if _finite(v)})

    workers.train_loop(spec, report)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------ (b) active-learning settings sweep


def _run_active_learning_sweep(sweep: SweepConfig, base: Config, root: Path, verbose: int) -> SweepResult:
    from ray import tune

    cfg = sweep.active_learning
    space = dict(cfg.search_space)
    _check_trial_fits(base, space, cfg.cpus_per_trial)
    experiment = f"{sweep.name}-active-learning"
    tracker = _tracking(sweep, root, experiment)  # creates the experiment (and its artifact root)
    summary = _summary_run(tracker, sweep, "active_learning", space)
    trainable = tune.with_resources(
        tune.with_parameters(
            active_learning_trial, base=base.to_dict(), root=str(root), tracking_uri=tracker.tracking_uri,
            experiment=experiment, sweep_name=sweep.name,
        ),
        {"cpu": cfg.cpus_per_trial},
    )
    results = _tune_run("active_learning", trainable, space, sweep=sweep, num_samples=cfg.num_samples,
                        metric=AL_METRIC, root=root, callbacks=[], verbose=verbose)
    # Nest each trial's experiment run (which holds its rounds) under the sweep's summary run.
    for r in results:
        run_id = (r.metrics or {}).get("parent_run_id")
        if run_id:
            tracker.log(str(run_id), tags={"mlflow.parentRunId": summary, "shoal.sweep": sweep.name})
    result = _finish_sweep("active_learning", AL_METRIC, results, "last", sweep=sweep, base=base, root=root,
                           tracker=tracker, summary=summary, space=space)
    _log_curves_figure(tracker, summary, results, root, list(space))
    return result


def _check_trial_fits(base: Config, space: Mapping[str, Any], cpus_per_trial: float) -> None:
    """A trial whose training workers cannot be placed beside it waits forever: refuse up front."""
    import ray

    have = float(ray.cluster_resources().get("CPU", 0))
    num_workers = space.get("train.num_workers", base.train.num_workers)
    cpus = space.get("train.cpus_per_worker", base.train.cpus_per_worker)
    if isinstance(num_workers, int) and isinstance(cpus, int) and num_workers > 0 and cpus_per_trial + num_workers * cpus > have:
        raise ValueError(
            f"active_learning.cpus_per_trial {cpus_per_trial} + train.num_workers x train.cpus_per_worker "
            f"{num_workers} x {cpus} exceeds the cluster's {have:g} CPUs; lower them or set train.num_workers: 0"
        )


def active_learning_trial(
    config: dict[str, Any], base: dict[str, Any], root: str, tracking_uri: str, experiment: str, sweep_name: str
) -> None:
    """One active-learning trial: a whole simulated experiment in ``<root>/trials/<trial id>``,
    logging to the sweep's MLflow experiment and reporting to Tune after every round.

    The loop runs in a Ray task of its own (a generator yielding each round) rather than in the
    trial: Ray Train refuses to run its in-process mode (``train.num_workers: 0``) inside a Tune
    trial, and a task is outside the trial's session. The trial's CPUs cover it (it waits meanwhile).
    """
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    values = dict(config)
    values.update({
        "experiment.name": f"{sweep_name}-{trial_id}",
        "tracking.tracking_uri": tracking_uri,
        "tracking.experiment_name": experiment,
    })
    cfg = config_from_dict(base, _overrides(values))
    run_rounds = ray.remote(num_cpus=0, max_retries=0)(_loop_rounds)
    counts: list[float] = []
    mious: list[float] = []
    for ref in run_rounds.remote(cfg.to_dict(), str(Path(root) / "trials" / trial_id)):
        row = ray.get(ref)
        counts.append(float(row["trained_on"]))
        mious.append(float(row["val_miou"]))
        tune.report({**row, AL_METRIC: workers.learning_curve_auc(counts, mious)})


def _loop_rounds(config: dict[str, Any], workdir: str) -> Iterator[dict[str, Any]]:
    """Run the experiment to its end, yielding one row of numbers per round."""
    from . import ActiveLearningLoop

    loop = ActiveLearningLoop(config_from_dict(config), workdir)
    while not loop.done:
        r = loop.step()
        if r is None:
            break
        assert loop.state is not None
        yield {
            "round": r.round, "val_miou": r.val_miou, "trained_on": r.trained_on, "labeled_count": r.labeled_count,
            "round_seconds": r.seconds, "parent_run_id": loop.state.parent_run_id or "",
        }


def _log_curves_figure(tracker: workers.Tracker, summary: str, results: Any, root: Path, keys: Sequence[str]) -> None:
    curves = {}
    for r in results:
        frame = r.metrics_dataframe
        if frame is None or "trained_on" not in frame or "val_miou" not in frame:
            continue
        label = trial_label({k: r.config.get(k) for k in keys}) or Path(r.path).name
        curves[label] = (frame["trained_on"].tolist(), frame["val_miou"].tolist())
    if curves:
        path = workers.plot_learning_curve(root / "learning_curves_active_learning.png", curves,
                                           title="active-learning sweep: every trial")
        tracker.log_artifacts(summary, [path])


def trial_label(values: Mapping[str, Any]) -> str:
    """A trial's values, short, for legends: ``strategy=fusion, entropy=0.7, budget=8`` (the last
    part of each key)."""
    parts = []
    for item in _overrides(values):
        key, value = item.split("=", 1)
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ", ".join(parts)
