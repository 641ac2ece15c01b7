"""MLflow tracking: one parent run per experiment, one child run per round.

Runs are found again by tags (``shoal.experiment_uid``, ``shoal.round``) rather than created blindly,
so an experiment that is resumed after a crash never logs the same round twice.
"""

from __future__ import annotations

import functools
import logging
import math
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG_UID = "shoal.experiment_uid"
TAG_ROUND = "shoal.round"
TAG_KIND = "shoal.run_kind"
TAG_STRATEGY = "shoal.strategy"
TAG_DATASET = "shoal.dataset"
TAG_GIT_COMMIT = "shoal.git_commit"
TAG_VERSION = "shoal.version"
TAG_MODEL_LOGGED = "shoal.model_uri"
# The MLflow 3 UI opens an experiment of this kind on its runs table (otherwise on GenAI traces).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
MODEL_PIP_REQUIREMENTS = ("torch", "numpy")
"""What a logged model needs to load back (torch.export programs need only torch); naming them
skips MLflow's requirement inference, which takes ~10 s."""


@functools.cache
def git_commit() -> str:
    """The commit of the Shoal source in use (``git rev-parse HEAD``), or "unknown" outside a git
    checkout (an installed wheel, a container image) or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


@functools.cache
def shoal_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shoal")
    except PackageNotFoundError:
        return "unknown"


def source_tags() -> dict[str, str]:
    """Tags naming the code that logged a run: Shoal's git commit and version. The commit also goes
    to MLflow's own ``mlflow.source.git.commit``, which the UI shows on the run page."""
    commit = git_commit()
    return {TAG_GIT_COMMIT: commit, "mlflow.source.git.commit": commit, TAG_VERSION: shoal_version()}


def default_tracking_uri(workdir: str | Path) -> str:
    """The local store used when no ``tracking_uri`` is configured: SQLite in the work dir."""
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


class Tracker:
    """A thin, explicit layer over ``MlflowClient`` (no global active-run state)."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment_name, artifact_location=artifact_location, tags={EXPERIMENT_KIND: MODEL_TRAINING})
            except Exception:  # created meanwhile by another process (e.g. a Ray worker)
                exp = self.client.get_experiment_by_name(experiment_name)
                if exp is None:
                    raise
        if exp is not None:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND not in exp.tags:
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        self.experiment_name = experiment_name

    def _find(self, tags: Mapping[str, str]) -> str | None:
        runs = self.search(tags, max_results=2)
        return runs[0].info.run_id if runs else None

    def search(self, tags: Mapping[str, str], max_results: int = 1000) -> list[Any]:
        """Runs of the experiment whose tags equal ``tags``, newest first (``mlflow.entities.Run``)."""
        query = " and ".join(f"tags.`{k}` = {_literal(v)}" for k, v in tags.items())
        return list(self.client.search_runs(
            [self.experiment_id], filter_string=query, max_results=max_results, order_by=["attributes.start_time DESC"]
        ))

    def experiment_runs(self, tags: Mapping[str, str], exclude: Sequence[str] = ()) -> list[str]:
        """Parent runs of other experiments in this MLflow experiment with ``tags`` (e.g. the random
        baseline on the same dataset), newest first, leaving out the run ids in ``exclude``."""
        runs = self.search({TAG_KIND: "experiment", **tags})
        return [r.info.run_id for r in runs if r.info.run_id not in exclude]

    def curve(self, run_id: str, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        """Two metrics of ``run_id`` paired by step (e.g. labeled count and val mIoU per round),
        the last value logged at each step."""
        xs = {m.step: m.value for m in self.client.get_metric_history(run_id, x_key)}
        ys = {m.step: m.value for m in self.client.get_metric_history(run_id, y_key)}
        steps = sorted(set(xs) & set(ys))
        return [xs[s] for s in steps], [ys[s] for s in steps]

    def parent_run(self, experiment_uid: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
        """The experiment's parent run id, created on first use."""
        key = {TAG_UID: experiment_uid, TAG_KIND: "experiment"}
        found = self._find(key)
        if found:
            return found
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**key, **(tags or {})})
        return str(run.info.run_id)

    def round_run(self, experiment_uid: str, parent_run_id: str, round_index: int, tags: Mapping[str, str] | None = None) -> str:
        """The child run of round ``round_index``, created on first use."""
        key = {TAG_UID: experiment_uid, TAG_KIND: "round", TAG_ROUND: str(round_index)}
        found = self._find(key)
        if found:
            return found
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"round-{round_index:03d}",
            tags={**key, "mlflow.parentRunId": parent_run_id, **(tags or {})},
        )
        return str(run.info.run_id)

    def log(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        existing = self.client.get_run(run_id).data.params
        # A resumed round logs its params again: MLflow refuses a changed value, so skip equal ones.
        param_list = [
            Param(k, _param_str(v)) for k, v in (params or {}).items() if existing.get(k) != _param_str(v)
        ]
        metric_list = [
            Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))
        ]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(param_list), len(metric_list), len(tag_list), 1), 100):
            self.client.log_batch(
                run_id, metrics=metric_list[i : i + 100], params=param_list[i : i + 100], tags=tag_list[i : i + 100]
            )

    def log_artifacts(self, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Upload files (an existing artifact of the same path is replaced, so a resumed round
        uploads again without duplicates)."""
        for p in paths:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def log_pytorch_model(
        self,
        run_id: str,
        model: Any,
        input_example: Any,
        *,
        name: str = "model",
        pip_requirements: Sequence[str] = MODEL_PIP_REQUIREMENTS,
        registered_model_name: str | None = None,
    ) -> str:
        """Log ``model`` (a ``torch.nn.Module`` in eval mode) with ``mlflow.pytorch.log_model`` into
        ``run_id`` and return its ``models:/`` URI; the run page then offers "Register model".

        MLflow 3 exports it with ``torch.export`` (the pt2 format, traced on ``input_example``, e.g.
        float32 ``[2, 3, H, W]``; a batch of 2 keeps the batch dimension dynamic). A model that
        does not export falls back to the pickle format. The URI is also kept in the run's
        ``shoal.model_uri`` tag, so a resumed experiment does not log it twice.
        """
        import mlflow
        import mlflow.pytorch

        found = self.tags(run_id).get(TAG_MODEL_LOGGED)
        if found:
            return found
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)  # log_model writes through the global active run
        try:
            with mlflow.start_run(run_id=run_id):
                kwargs: dict[str, Any] = {
                    "name": name, "input_example": input_example, "pip_requirements": list(pip_requirements),
                    "registered_model_name": registered_model_name,
                }
                try:
                    info = mlflow.pytorch.log_model(model, **kwargs)
                except Exception as exc:  # torch.export cannot trace every model
                    log.warning("torch.export of the model failed (%s); logging it in the pickle format", exc)
                    info = mlflow.pytorch.log_model(model, serialization_format="pickle", **kwargs)
        finally:
            mlflow.set_tracking_uri(previous)
        uri = str(info.model_uri)
        self.log(run_id, tags={TAG_MODEL_LOGGED: uri})
        return uri

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _literal(value: str) -> str:
    """A string literal for an MLflow filter: single-quoted, or double-quoted when it holds a '."""
    return f"'{value}'" if "'" not in value else f'"{value}"'
