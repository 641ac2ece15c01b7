"""What the phases of a round share, and what one labeling unit is.

:class:`Context` carries the experiment's config, work dir, table store, state and acquisition unit
and opens the Ray and MLflow connections on first use; every phase module receives it instead of
the whole loop. :class:`AcquisitionUnit` is the interface of a labeling unit (a whole image, a
region): everything that differs between units lives behind it, and ``orchestrator._units.build_unit``
picks one from the config, once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

import workers

from ._config import Config
from ._state import State
from ._table import TableStore


class AcquisitionUnit(Protocol):
    """One kind of labeling unit: how its rounds score, select and label, and what its budget is.

    The loop's phases call these methods and never ask which unit they hold. Implementations:
    ``ImageUnit`` (``_image_unit.py``) and ``RegionUnit`` (``_region_unit.py``).
    """

    name: str
    """``image`` or ``region``: the value of ``loop.unit``."""
    strategy: Any
    """The configured strategy of this unit's contract, built once from ``loop.strategy``."""

    def check(self, config: Config) -> None:
        """Refuse, before anything is written, what this unit cannot run (a strategy reading columns
        its scorer does not write, SAM columns without ``sam.enabled``)."""

    def check_pool(self, n_unlabeled: int) -> None:
        """Refuse a budget that ``n_unlabeled`` pool images (after the initial set) cannot pay for."""

    def prepare_table(self, table: pd.DataFrame) -> pd.DataFrame:
        """The first revision's unit-specific columns (before anything is labeled)."""

    def initial_labels(self, ctx: Context, table: pd.DataFrame, classes: Any) -> tuple[pd.DataFrame, str] | None:
        """The labels the experiment starts with when the unit has a protocol of its own (random
        regions), with a comment for the first revision; None = whole images, chosen by the start."""

    def open_pool(self, df: pd.DataFrame) -> pd.Series:
        """Train rows with something left to label."""

    def weight_factors(self, rows: pd.DataFrame) -> pd.Series | None:
        """Per labeled row (by sample id), a factor on its training weight; None = 1 for all."""

    def score(self, ctx: Context) -> dict[str, Any]:
        """The score phase: score what can be selected with the round's model."""

    def select(self, ctx: Context, rng: np.random.Generator) -> tuple[dict[str, Any], pd.DataFrame]:
        """The select phase: (its state info with ``selected`` image ids, the selection table in
        rank order with every pick's scores, ``priority`` and ``reason``)."""

    def label(self, ctx: Context) -> dict[str, Any]:
        """The label phase with the simulated oracle: a new table revision holding the labels."""

    def request_labels(self, ctx: Context) -> dict[str, Any] | None:
        """The label phase with people: export the selection and record the request (None: the
        round waits); once answers were imported, the phase's result."""

    def import_answers(self, ctx: Context, request: dict[str, Any], source: Path) -> dict[str, Any]:
        """Validate people's answers in ``source`` against the open ``request`` and add them in one
        table revision (nothing added when one answer is bad)."""


@dataclass
class Context:
    """The experiment a phase works on. ``state`` is None until the experiment has started.

    ``rounds_unit`` labels the rounds; ``seed_unit`` labels round 0, the whole images people are
    asked for before any model exists when an experiment starts with no label at all.
    """

    config: Config
    workdir: Path
    store: TableStore
    rounds_unit: AcquisitionUnit
    seed_unit: AcquisitionUnit
    state: State | None = None
    display: Any = None
    """How progress is shown (``orchestrator._progress.Display``); None = not at all."""
    monitor: Any = None
    """The running phase's ``PhaseMonitor`` (what workers report goes there), or None."""
    dashboard_url: str | None = None
    _tracker: workers.Tracker | None = field(default=None, repr=False)
    _classes: Any = field(default=None, repr=False)
    _tables: OrderedDict[str, pd.DataFrame] = field(default_factory=OrderedDict, repr=False)

    _TABLES_KEPT = 2

    @property
    def unit(self) -> AcquisitionUnit:
        """The acquisition unit of the round in progress."""
        return self.seed_unit if self.state is not None and self.state.round == 0 else self.rounds_unit

    @property
    def round_state(self) -> State:
        """The state of a started experiment."""
        if self.state is None:
            raise ValueError(f"no experiment has started in {self.workdir}")
        return self.state

    def save_state(self) -> None:
        self.round_state.save(self.workdir)

    def round_dir(self, round_index: int | None = None) -> Path:
        """``<workdir>/rounds/round-NNN`` of ``round_index`` (default: the round in progress), created."""
        index = self.round_state.round if round_index is None else round_index
        d = self.workdir / "rounds" / f"round-{index:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def classes(self) -> Any:
        """The experiment's ``workers.ClassInfo`` (``classes.json``, written at the start)."""
        if self._classes is None:
            data = json.loads((self.workdir / "classes.json").read_text())
            self._classes = workers.ClassInfo(names=tuple(data["classes"]), ignore_index=int(data["ignore_index"]))
        return self._classes

    def read(self, revision: str) -> pd.DataFrame:
        """Table revision ``revision``, a copy the caller may change. Revisions are immutable, so
        the last few read are kept in memory rather than decoded again in the next phase."""
        if revision not in self._tables:
            self._tables[revision] = self.store.read(revision)
            while len(self._tables) > self._TABLES_KEPT:
                self._tables.popitem(last=False)
        self._tables.move_to_end(revision)
        return self._tables[revision].copy()

    def ray(self) -> None:
        """Connect to the configured Ray cluster, or start a local one (once per process); the
        dashboard's address is printed once when progress is shown."""
        url = workers.ensure_ray(self.config.ray.address, self.config.ray.num_cpus, self.config.ray.log_to_driver)
        if url and url != self.dashboard_url:
            self.dashboard_url = url
            if self.display is not None and self.display.mode != "off":
                print(f"Ray dashboard: {url}", flush=True)

    def progress_dir(self, phase: str) -> str:
        """Where the workers of ``phase`` in the round in progress write their progress."""
        return str(self.round_dir() / "progress" / phase)

    def expect(self, kind: str, total: int) -> None:
        """Tell whoever shows progress that ``total`` images of ``kind`` are to be done."""
        if self.monitor is not None:
            self.monitor.expect(kind, total)

    def job_name(self, what: str) -> str:
        """``<experiment>-round-NNN-<what>``: how the round's work is named in Ray's dashboard."""
        return f"{self.config.experiment.name}-round-{self.round_state.round:03d}-{what}"

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.tracking_uri or workers.default_tracking_uri(self.workdir)

    def tracker(self) -> workers.Tracker:
        if self._tracker is None:
            local = self.config.tracking.tracking_uri is None
            self._tracker = workers.Tracker(
                self.tracking_uri,
                self.config.tracking.experiment_name or self.config.experiment.name,
                artifact_location=(self.workdir / "mlartifacts").as_uri() if local else None,
            )
        return self._tracker

    def label_studio(self) -> Any:
        """The experiment's ``LabelStudioSpec`` with ``oracle.kind: label-studio``, else None."""
        oracle = self.config.oracle
        if oracle.kind != "label-studio":
            return None
        from ._labelstudio import label_studio_spec

        return label_studio_spec(tuple(self.classes().names), oracle.label_map, self.workdir, oracle.image_root_url,
                                 oracle.local_files_root)

    def sam_spec(self) -> Any:
        """The ``workers.SamSpec`` of the ``sam`` section (its cache under the work dir by default)."""
        return workers.SamSpec.from_config(asdict(self.config.sam), self.config.sam.cache_uri or str(self.workdir / "sam_cache"))

    def rng(self, stream: int) -> np.random.Generator:
        """The round's generator for ``stream`` (1 = selection), the same on every resume."""
        return np.random.default_rng([self.config.experiment.seed, self.round_state.round, stream])
