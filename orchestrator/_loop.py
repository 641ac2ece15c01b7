"""The active-learning loop: a stepper over rounds of train, score, select, label and track.

Every phase ends by writing the state file atomically, so an experiment killed at any moment
resumes from the last finished phase and, with the same seed, ends with the same labeled set.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

import workers
from strategies import build_strategy

from ._atomic import atomic_write, atomic_write_json, atomic_write_text
from ._config import Config, config_from_dict
from ._oracle import build_oracle
from ._state import STATE_FILE, State
from ._table import (
    IMAGE_PATH,
    LABELED,
    MASK_PATH,
    META_PREFIX,
    ROUND_LABELED,
    SAMPLE_ID,
    SPLIT,
    TRAIN_SPLIT,
    VAL_SPLIT,
    WEIGHT,
    TableStore,
)

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


@dataclass
class RoundResult:
    """What one round did: the ids it added, the metrics of the model it trained, its timings."""

    round: int
    added: list[str]
    trained_on: int
    """Labeled samples the round's model was trained on."""
    labeled_count: int
    """Labeled samples after the round's labeling."""
    metrics: dict[str, float]
    timings: dict[str, float]
    revision: str
    strategy: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def val_miou(self) -> float:
        return self.metrics["val_miou"]

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))


class ActiveLearningLoop:
    """Runs active-learning rounds for one experiment kept entirely under ``workdir``.

    ``step()`` runs (or finishes, after an interruption) one round and returns its
    :class:`RoundResult`; ``run()`` steps until a stopping criterion holds. A work dir that already
    holds an experiment is continued, provided its config is the same.
    """

    def __init__(self, config: Config, workdir: str | Path) -> None:
        self.config = config
        self.workdir = Path(workdir).resolve()
        self.store = TableStore(self.workdir / "table")
        self._tracker: workers.Tracker | None = None
        snapshot = self.workdir / CONFIG_FILE
        if (self.workdir / STATE_FILE).exists():
            saved = yaml.safe_load(snapshot.read_text()) if snapshot.exists() else None
            if saved != config.to_dict():
                raise ValueError(
                    f"{self.workdir} holds an experiment with a different config; "
                    f"continue it with `shoal resume {self.workdir}` or choose another --workdir"
                )
            self.state: State | None = State.load(self.workdir)
        else:
            self.state = None

    @classmethod
    def resume(cls, workdir: str | Path) -> ActiveLearningLoop:
        """The experiment in ``workdir``, with the config it was started with."""
        workdir = Path(workdir)
        snapshot = workdir / CONFIG_FILE
        if not (workdir / STATE_FILE).exists() or not snapshot.exists():
            raise FileNotFoundError(f"no Shoal experiment to resume in {workdir}")
        return cls(config_from_dict(yaml.safe_load(snapshot.read_text())), workdir)

    # ------------------------------------------------------------------ public API

    @property
    def done(self) -> bool:
        return self.state is not None and self.state.stopped is not None

    @property
    def stop_reason(self) -> str | None:
        return self.state.stopped if self.state else None

    @property
    def history(self) -> list[RoundResult]:
        return [RoundResult(**h) for h in self.state.history] if self.state else []

    def run(self) -> list[RoundResult]:
        """Step until a stopping criterion holds; return the rounds run by this call."""
        results = []
        while not self.done:
            result = self.step()
            if result is None:
                break
            results.append(result)
        return results

    def step(self) -> RoundResult | None:
        """Run the phases left in the current round; None when the experiment has stopped."""
        state = self._ensure_started()
        if state.stopped:
            return None
        start_round = state.round
        while state.round == start_round and not state.stopped:
            phase = state.next_phase()
            assert phase is not None
            t0 = time.perf_counter()
            info = getattr(self, f"_phase_{phase}")(state)
            info["seconds"] = info.get("seconds", time.perf_counter() - t0)
            state.round_info[phase] = info
            state.phase = phase
            if phase == "track":
                self._finish_round(state)
            state.save(self.workdir)
        return RoundResult(**state.history[-1])

    def status(self) -> dict[str, Any]:
        """A summary of where the experiment stands (what ``shoal status`` prints)."""
        if self.state is None:
            return {"workdir": str(self.workdir), "started": False}
        s = self.state
        info = self.store.info(s.revision)
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
        }

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.tracking_uri or workers.default_tracking_uri(self.workdir)

    # ------------------------------------------------------------------ set-up

    def _ensure_started(self) -> State:
        if self.state is not None:
            return self.state
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        table, classes = self._build_table()
        n_train = int((table[SPLIT] == TRAIN_SPLIT).sum())
        if cfg.loop.initial_labeled > n_train:
            raise ValueError(
                f"loop.initial_labeled: {cfg.loop.initial_labeled} exceeds the {n_train} train samples"
            )
        if cfg.loop.budget > n_train - cfg.loop.initial_labeled:
            raise ValueError(
                f"loop.budget: {cfg.loop.budget} samples per round exceeds the "
                f"{n_train - cfg.loop.initial_labeled} unlabeled samples left after the initial set"
            )
        if (table[SPLIT] == VAL_SPLIT).sum() == 0:
            raise ValueError("the validation split is empty: data.val_dir (or data.synthetic.num_val)")
        train_ids = np.sort(table.loc[table[SPLIT] == TRAIN_SPLIT, SAMPLE_ID].to_numpy())
        rng = np.random.default_rng([cfg.experiment.seed, 0])
        initial = set(rng.choice(train_ids, size=cfg.loop.initial_labeled, replace=False).tolist())
        chosen = table[SAMPLE_ID].isin(initial)
        table.loc[chosen, LABELED] = True
        table.loc[chosen, ROUND_LABELED] = 0
        table.loc[chosen, WEIGHT] = 1.0
        atomic_write_text(self.workdir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write_json(self.workdir / "classes.json", {"classes": list(classes.names), "ignore_index": classes.ignore_index})
        rev = self.store.write(
            table, parent=None, round=0, comment=f"initial: {len(initial)} random samples labeled"
        )
        state = State(experiment_uid=uuid.uuid4().hex, revision=rev)
        state.save(self.workdir)
        self.state = state
        return state

    def _build_table(self) -> tuple[pd.DataFrame, Any]:
        cfg = self.config.data
        if cfg.kind == "synthetic":
            s = cfg.synthetic
            root = self.workdir / "data" / "synthetic"
            classes, train = workers.generate_synthetic(root / "train", s.num_train, s.height, s.width, s.seed, prefix="train")
            val_classes, val = workers.generate_synthetic(root / "val", s.num_val, s.height, s.width, s.seed + 1, prefix="val")
        else:
            assert cfg.train_dir is not None and cfg.val_dir is not None
            classes, train = workers.scan_folder_dataset(cfg.train_dir)
            val_classes, val = workers.scan_folder_dataset(cfg.val_dir)
        if tuple(val_classes.names) != tuple(classes.names) or val_classes.ignore_index != classes.ignore_index:
            raise ValueError(f"data.val_dir: its classes {val_classes} differ from data.train_dir's {classes}")
        rows = []
        for split, records in ((TRAIN_SPLIT, train), (VAL_SPLIT, val)):
            for r in records:
                rows.append({
                    SAMPLE_ID: f"{split}/{r.sample_id}" if split == VAL_SPLIT else r.sample_id,
                    IMAGE_PATH: r.image_path,
                    MASK_PATH: r.mask_path,
                    SPLIT: split,
                    LABELED: False,
                    WEIGHT: 0.0,
                    ROUND_LABELED: -1,
                    **{f"{META_PREFIX}{k}": v for k, v in r.metadata.items()},
                })
        if not any(r[SPLIT] == TRAIN_SPLIT for r in rows):
            raise ValueError("the train split is empty: data.train_dir (or data.synthetic.num_train)")
        table = pd.DataFrame(rows)
        table[ROUND_LABELED] = table[ROUND_LABELED].astype("int64")
        return table, classes

    def _classes(self) -> Any:
        import json

        data = json.loads((self.workdir / "classes.json").read_text())
        return workers.ClassInfo(names=tuple(data["classes"]), ignore_index=int(data["ignore_index"]))

    def _round_dir(self, state: State) -> Path:
        d = self.workdir / "rounds" / f"round-{state.round:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _tracker_(self) -> workers.Tracker:
        if self._tracker is None:
            local = self.config.tracking.tracking_uri is None
            self._tracker = workers.Tracker(
                self.tracking_uri,
                self.config.tracking.experiment_name or self.config.experiment.name,
                artifact_location=(self.workdir / "mlartifacts").as_uri() if local else None,
            )
        return self._tracker

    def _ray(self) -> None:
        workers.ensure_ray(self.config.ray.address, self.config.ray.num_cpus)

    # ------------------------------------------------------------------ phases

    def _phase_train(self, state: State) -> dict[str, Any]:
        cfg = self.config
        self._ray()
        df = self.store.read(state.revision)
        labeled = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED] & (df[WEIGHT] > 0)]
        val = df[df[SPLIT] == VAL_SPLIT]
        classes = self._classes()
        spec = workers.TrainSpec(
            model_name=cfg.model.name,
            model_options=dict(cfg.model.options),
            class_names=tuple(classes.names),
            ignore_index=classes.ignore_index,
            image_size=cfg.data.image_size,
            train_images=labeled[IMAGE_PATH].tolist(),
            train_masks=labeled[MASK_PATH].tolist(),
            train_weights=labeled[WEIGHT].astype(float).tolist(),
            val_images=val[IMAGE_PATH].tolist(),
            val_masks=val[MASK_PATH].tolist(),
            epochs=cfg.train.epochs,
            samples_per_epoch=cfg.train.samples_per_epoch or len(labeled),
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            seed=cfg.experiment.seed * 1000 + state.round,
            output_dir=str(self._round_dir(state)),
            use_gpu=cfg.train.use_gpu,
        )
        result = workers.train(
            spec,
            num_workers=cfg.train.num_workers,
            cpus_per_worker=cfg.train.cpus_per_worker,
            storage_path=str(self.workdir / "ray_train"),
            run_name=f"round-{state.round:03d}-{uuid.uuid4().hex[:6]}",
        )
        info = asdict(result)
        info["trained_on"] = len(labeled)
        info["seconds"] = result.train_seconds
        return info

    def _phase_score(self, state: State) -> dict[str, Any]:
        cfg = self.config
        strategy = build_strategy(cfg.loop.strategy)
        if not strategy.required_columns:
            return {"scores_dir": None, "num_scored": 0, "seconds": 0.0}
        self._ray()
        df = self.store.read(state.revision)
        pool = df.loc[(df[SPLIT] == TRAIN_SPLIT) & ~df[LABELED], [SAMPLE_ID, IMAGE_PATH]]
        round_dir = self._round_dir(state)
        pool_file = round_dir / "pool.parquet"
        atomic_write(pool_file, lambda p: pool.to_parquet(p, index=False))
        result = workers.score_pool(
            str(pool_file),
            state.round_info["train"]["checkpoint_path"],
            cfg.data.image_size,
            str(round_dir / "scores"),
            num_actors=cfg.score.num_actors,
            batch_size=cfg.score.batch_size,
            cpus_per_actor=cfg.score.cpus_per_actor,
            gpus_per_actor=cfg.score.gpus_per_actor,
        )
        if result.num_scored != len(pool):
            raise RuntimeError(f"scoring returned {result.num_scored} rows for a pool of {len(pool)}")
        return asdict(result)

    def _candidates(self, state: State) -> pd.DataFrame:
        df = self.store.read(state.revision)
        pool = df.loc[(df[SPLIT] == TRAIN_SPLIT) & ~df[LABELED], [SAMPLE_ID]]
        scores_dir = state.round_info["score"]["scores_dir"]
        if scores_dir is None:
            return pool
        scores = workers.read_scores(scores_dir)
        merged = pool.merge(scores, on=SAMPLE_ID, how="left", validate="one_to_one")
        return merged

    def _phase_select(self, state: State) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        candidates = self._candidates(state)
        strategy = build_strategy(cfg.loop.strategy)
        budget = min(cfg.loop.budget, len(candidates))
        rng = np.random.default_rng([cfg.experiment.seed, state.round, 1])
        selected = strategy.select(candidates, budget, rng)
        seconds = time.perf_counter() - t0
        chosen = candidates.set_index(SAMPLE_ID).loc[selected].reset_index()
        chosen.insert(0, "rank", np.arange(1, len(chosen) + 1))
        path = self._round_dir(state) / "selection.csv"
        atomic_write(path, lambda p: chosen.to_csv(p, index=False))
        return {"selected": selected, "selection_file": str(path), "seconds": seconds}

    def _phase_label(self, state: State) -> dict[str, Any]:
        cfg = self.config
        selected = state.round_info["select"]["selected"]
        latest = self.store.revisions()[-1]
        latest_info = self.store.info(latest)
        parent = state.revision
        if latest_info.parent == parent and latest_info.round == state.round:
            # Written by this phase before an interruption: reuse it rather than fork the lineage.
            return {"revision": latest, "parent": parent, "added": selected}
        df = self.store.read(parent)
        oracle = build_oracle(cfg.oracle.kind)
        masks = oracle.label(df, selected)
        candidates = self._candidates(state)
        score_cols = [c for c in candidates.columns if c != SAMPLE_ID]
        df = df.drop(columns=[c for c in score_cols if c in df.columns])
        df = df.merge(candidates, on=SAMPLE_ID, how="left")
        idx = df[SAMPLE_ID].isin(selected)
        df.loc[idx, LABELED] = True
        df.loc[idx, ROUND_LABELED] = state.round
        df.loc[idx, WEIGHT] = 1.0
        df.loc[idx, MASK_PATH] = df.loc[idx, SAMPLE_ID].map(masks)
        rev = self.store.write(
            df, parent=parent, round=state.round,
            comment=f"round {state.round}: +{len(selected)} by {cfg.loop.strategy}",
        )
        return {"revision": rev, "parent": parent, "added": selected}

    def _phase_track(self, state: State) -> dict[str, Any]:
        cfg = self.config
        tracker = self._tracker_()
        classes = self._classes()
        if state.parent_run_id is None:
            state.parent_run_id = tracker.parent_run(
                state.experiment_uid, cfg.experiment.name,
                tags={"shoal.workdir": str(self.workdir), "shoal.strategy": cfg.loop.strategy},
            )
            tracker.log(state.parent_run_id, params=cfg.flat())
            state.save(self.workdir)
        info = state.round_info
        train, label = info["train"], info["label"]
        child = tracker.round_run(state.experiment_uid, state.parent_run_id, state.round,
                                  tags={"shoal.strategy": cfg.loop.strategy})
        labeled_after = self.store.info(label["revision"]).num_labeled
        metrics = self._round_metrics(state, classes.names, labeled_after)
        tracker.log(
            child,
            params={**cfg.flat(), "round": state.round, "table_revision": label["revision"],
                    "table_parent_revision": label["parent"], "trained_on_revision": label["parent"]},
            metrics=metrics,
            step=state.round,
        )
        for epoch in train["history"]:
            tracker.log(child, metrics={"epoch_val_miou": epoch["val_miou"], "epoch_train_loss": epoch["train_loss"]},
                        step=int(epoch["epoch"]))
        lineage = [asdict(i) for i in self.store.lineage(label["revision"])]
        lineage_file = self._round_dir(state) / "revision.json"
        atomic_write_json(lineage_file, {"revision": label["revision"], "parent": label["parent"], "lineage": lineage})
        tracker.log_artifacts(child, [info["select"]["selection_file"], lineage_file])
        tracker.finish(child)
        tracker.log(state.parent_run_id, metrics={
            "val_miou": metrics["val_miou"], "trained_on": metrics["trained_on"], "labeled_count": labeled_after,
        }, step=state.round)
        return {"child_run_id": child}

    def _round_metrics(self, state: State, names: tuple[str, ...], labeled_after: int) -> dict[str, float]:
        info = state.round_info
        train = info["train"]
        metrics = {
            "val_miou": train["val_miou"],
            "val_pixel_accuracy": train["val_pixel_accuracy"],
            "trained_on": float(train["trained_on"]),
            "labeled_count": float(labeled_after),
            "added": float(len(info["select"]["selected"])),
            "train_seconds": info["train"]["seconds"],
            "score_seconds": info["score"]["seconds"],
            "select_seconds": info["select"]["seconds"],
            "label_seconds": info["label"]["seconds"],
        }
        for name, iou in zip(names, train["val_iou_per_class"]):
            metrics[f"val_iou_{name}"] = iou
        return metrics

    def _finish_round(self, state: State) -> None:
        cfg = self.config
        info = state.round_info
        labeled_after = self.store.info(info["label"]["revision"]).num_labeled
        metrics = self._round_metrics(state, self._classes().names, labeled_after)
        timings = {p: float(info[p]["seconds"]) for p in ("train", "score", "select", "label", "track")}
        result = RoundResult(
            round=state.round, added=list(info["select"]["selected"]), trained_on=int(info["train"]["trained_on"]),
            labeled_count=labeled_after, metrics=metrics, timings=timings, revision=info["label"]["revision"],
            strategy=cfg.loop.strategy, extra={"child_run_id": info["track"]["child_run_id"]},
        )
        state.history.append(asdict(result))
        state.revision = info["label"]["revision"]
        df = self.store.read(state.revision)
        pool_left = int(((df[SPLIT] == TRAIN_SPLIT) & ~df[LABELED]).sum())
        if state.round >= cfg.loop.rounds:
            state.stopped = f"rounds: {state.round} of {cfg.loop.rounds} done"
        elif pool_left == 0:
            state.stopped = "pool exhausted: every train sample is labeled"
        if state.stopped:
            tracker = self._tracker_()
            assert state.parent_run_id is not None
            tracker.log(state.parent_run_id, metrics={
                "final_val_miou": metrics["val_miou"], "rounds": float(state.round)},
                tags={"shoal.stopped": state.stopped})
            tracker.finish(state.parent_run_id)
        state.round += 1
        state.phase = ""
        state.round_info = {}
