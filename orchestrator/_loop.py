"""The active-learning loop: a stepper over rounds of train, score, select, label and track.

Each phase is a module with ``run(ctx)``; they share a :class:`~orchestrator._context.Context`
(config, work dir, table store, state, acquisition unit, Ray and MLflow handles), and whatever
differs between labeling whole images and labeling regions lives in the acquisition unit. Every
phase ends by writing the state file atomically, so an experiment killed at any moment resumes from
the last finished phase and, with the same seed, ends with the same labeled set.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from . import _faults, _label, _people, _pool, _score, _select, _start, _track, _train
from ._config import Config, config_from_dict
from ._context import Context
from ._lock import LOCK_FILE, WorkdirLocked, writing
from ._progress import Display, PhaseMonitor
from ._round import awaiting_labels
from ._state import CONFIG_FILE, STATE_FILE, State
from ._table import TableStore
from ._track import RoundResult
from ._units import build_seed_unit, build_unit

__all__ = ["ActiveLearningLoop", "RoundResult"]

PHASES: dict[str, Callable[[Context], dict[str, Any] | None]] = {
    "train": _train.run, "score": _score.run, "select": _select.run, "label": _label.run, "track": _track.run,
}
"""Each phase of a round, in order: its result goes into the state, or None while people label."""


class ActiveLearningLoop:
    """Runs active-learning rounds for one experiment kept entirely under ``workdir``.

    ``step()`` runs (or finishes, after an interruption) one round and returns its
    :class:`RoundResult`; ``run()`` steps until a stopping criterion holds. A work dir that already
    holds an experiment is continued, provided its config is the same.
    """

    def __init__(self, config: Config, workdir: str | Path, progress: str = "off") -> None:
        """``progress``: ``off`` (the default for the API), ``bar`` (live bars on stderr), ``lines``
        (a line per epoch and per scoring pass on stdout) or ``auto`` (bars on a terminal, else
        lines). ``<workdir>/progress.json`` is kept either way, for ``shoal status``."""
        self.config = config
        self.workdir = Path(workdir).resolve()
        self.store = TableStore(self.workdir / "table")
        state = None
        snapshot = self.workdir / CONFIG_FILE
        if (self.workdir / STATE_FILE).exists():
            saved = yaml.safe_load(snapshot.read_text()) if snapshot.exists() else None
            if isinstance(saved, dict):  # settings added since the experiment started keep their defaults
                with contextlib.suppress(ValueError, TypeError):
                    saved = config_from_dict(saved).to_dict()
            if saved != config.to_dict():
                raise ValueError(
                    f"{self.workdir} holds an experiment with a different config; "
                    f"continue it with `shoal resume {self.workdir}` or choose another --workdir"
                )
            state = State.load(self.workdir)
        self.ctx = Context(config, self.workdir, self.store, rounds_unit=build_unit(config),
                           seed_unit=build_seed_unit(config), state=state, display=Display(progress))

    @classmethod
    def resume(cls, workdir: str | Path, progress: str = "off") -> ActiveLearningLoop:
        """The experiment in ``workdir``, with the config it was started with."""
        workdir = Path(workdir)
        snapshot = workdir / CONFIG_FILE
        if not (workdir / STATE_FILE).exists() or not snapshot.exists():
            raise FileNotFoundError(f"no Shoal experiment to resume in {workdir}")
        return cls(config_from_dict(yaml.safe_load(snapshot.read_text())), workdir, progress)

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> State | None:
        return self.ctx.state

    @state.setter
    def state(self, state: State | None) -> None:
        self.ctx.state = state

    @property
    def done(self) -> bool:
        return self.state is not None and self.state.stopped is not None

    @property
    def stop_reason(self) -> str | None:
        return self.state.stopped if self.state else None

    @property
    def history(self) -> list[RoundResult]:
        return [RoundResult(**h) for h in self.state.history] if self.state else []

    @property
    def tracking_uri(self) -> str:
        return self.ctx.tracking_uri

    @property
    def awaiting_labels(self) -> dict[str, Any] | None:
        """The open label request (task folder, requested and received ids), or None."""
        return awaiting_labels(self.state)

    def start(self) -> State:
        """Start the experiment if it has not started: check the config's names and options and the
        data, build the sample table and label the initial set (no training); the state either
        way. A refused start leaves nothing."""
        if self.ctx.state is not None:
            return self.ctx.state
        _start.check_config(self.ctx)  # nothing is written before the config is known to run
        existed = self.workdir.exists()
        had_lock = (self.workdir / LOCK_FILE).exists()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            with self._writing():
                if self.ctx.state is None:  # another process may have started it while we waited
                    self.ctx.state = _start.start(self.ctx)
        except WorkdirLocked:
            raise  # the other writer's work dir: leave it alone
        except BaseException:
            if not existed:  # a refused start leaves nothing behind
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif not had_lock and not (self.workdir / STATE_FILE).exists():  # a folder of the user's: as it was
                (self.workdir / LOCK_FILE).unlink(missing_ok=True)
            raise
        return self.ctx.state

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the work dir's lock (one writer at a time) and, on taking it, read the state again:
        another process may have changed it since this object read it."""
        with writing(self.workdir):
            if (self.workdir / STATE_FILE).exists():
                self.ctx.state = State.load(self.workdir)
            yield

    def step(self) -> RoundResult | None:
        """Run the phases left in the current round; None when the experiment has stopped or waits
        for people."""
        self.start()
        with self._writing():
            return self._step()

    def _step(self) -> RoundResult | None:
        state = self.ctx.round_state
        if state.stopped:
            return None
        start_round = state.round
        while state.round == start_round and not state.stopped:
            phase = state.next_phase()
            assert phase is not None
            t0 = time.perf_counter()
            _faults.checkpoint(f"{phase}:before")
            monitor = PhaseMonitor(self.workdir, state.round, phase, Path(self.ctx.progress_dir(phase)),
                                   self.ctx.display)
            self.ctx.monitor = monitor
            try:
                with monitor:
                    info = PHASES[phase](self.ctx)
            finally:
                self.ctx.monitor = None
            if info is None:  # waiting for people: this process has nothing more to do
                state.save(self.workdir)
                return None
            info["seconds"] = info.get("seconds", time.perf_counter() - t0)
            state.round_info[phase] = info
            state.phase = phase
            if phase == "track":
                _track.finish_round(self.ctx)
            elif state.round == 0 and phase == "label":  # people's first labels are in: round 1 trains
                _track.finish_seed_round(self.ctx)
                start_round = 1
            _faults.checkpoint(f"{phase}:after")
            state.save(self.workdir)
        return RoundResult(**state.history[-1])

    def run(self) -> list[RoundResult]:
        """Step until a stopping criterion holds; return the rounds run by this call."""
        return list(self.rounds())

    def rounds(self) -> Iterator[RoundResult]:
        """Step until a stopping criterion holds or labels are awaited, yielding each round's
        result; the work dir's lock is held throughout, so no other writer slips in between rounds."""
        self.start()
        with self._writing():
            while not self.done:
                result = self.step()
                if result is None:
                    return
                yield result

    def status(self) -> dict[str, Any]:
        """A summary of where the experiment stands (what ``shoal status`` prints)."""
        if self.state is None:
            return {"workdir": str(self.workdir), "started": False}
        s = self.state
        info = self.store.info(s.revision)
        request = self.awaiting_labels
        awaiting = None
        if request is not None:
            missing = [i for i in request["requested"] if i not in request["received"]]
            awaiting = {"task_dir": request["task_dir"], "requested": len(request["requested"]),
                        "received": len(request["received"]), "missing": missing}
        return {
            "workdir": str(self.workdir),
            "started": True,
            "round": s.round,
            "last_phase": s.phase or "(none)",
            "next_phase": s.next_phase(),
            "stopped": s.stopped,
            "revision": s.revision,
            "labeled": info.num_labeled,
            "rounds_done": len(s.history),
            "val_miou": [h["metrics"].get("val_miou") for h in s.history],
            "tracking_uri": self.tracking_uri,
            "awaiting_labels": awaiting,
        }

    # ------------------------------------------------------------------ people in the loop

    def import_labels(self, source: str | Path, task_dir: str | Path | None = None) -> dict[str, Any]:
        """Validate every mask in ``source`` (a folder of PNGs or a Label Studio JSON export) against
        the awaited selection (or the relabel task ``task_dir``) and add them in one step.

        A bad file raises ``ValueError`` naming it, and nothing is added. Masks already imported
        with the same content are skipped, so importing the same labels twice changes nothing.
        In a region run the awaited labels are regions, kept inside the asked regions only.
        """
        self._require_state()
        with self._writing():
            return _people.import_labels(self.ctx, source, task_dir)

    def edit(self, *, weights: dict[str, float] | None = None, exclude: dict[str, bool] | None = None,
             relabel: list[str] | None = None, comment: str) -> str:
        """Apply a curation edit as a new table revision naming its parent and ``comment``.

        ``weights``: sample id -> weight (0 = kept but never drawn for training); ``exclude``: sample
        id -> excluded from training or restored; ``relabel``: labeled ids to send back to people
        (a task folder is written for interactive oracles). Returns the new revision id.
        """
        self._require_state()
        with self._writing():
            return _people.edit(self.ctx, weights=weights, exclude=exclude, relabel=relabel, comment=comment)

    def add_images(self, folder: str | Path | None = None) -> dict[str, Any]:
        """New images join the pool as one table revision (between rounds, or while labels are
        awaited): those of ``folder`` (default ``data.train_dir``) that the experiment does not hold.
        Duplicates by content and, with ``data.skip_unreadable``, unreadable images are reported and
        skipped; nothing already labeled changes. See ``orchestrator._pool.add_images``."""
        self._require_state()
        with self._writing():
            return _pool.add_images(self.ctx, folder)

    def _require_state(self) -> State:
        if self.state is None:
            raise ValueError(f"no experiment has started in {self.workdir}")
        return self.state
