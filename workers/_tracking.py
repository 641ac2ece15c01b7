"""MLflow tracking: one parent run per experiment, one child run per round.

Runs are found again by tags (``shoal.experiment_uid``, ``shoal.round``) rather than created blindly,
so an experiment that is resumed after a crash never logs the same round twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG_UID = "shoal.experiment_uid"
TAG_ROUND = "shoal.round"
TAG_KIND = "shoal.run_kind"


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
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            self.experiment_id = exp.experiment_id
        self.experiment_name = experiment_name

    def _find(self, tags: Mapping[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=2)
        return runs[0].info.run_id if runs else None

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
        for p in paths:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
