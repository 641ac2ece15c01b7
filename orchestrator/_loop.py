"""The active-learning loop: a stepper over rounds of train, score, select, label and track.

Every phase ends by writing the state file atomically, so an experiment killed at any moment
resumes from the last finished phase and, with the same seed, ends with the same labeled set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

import workers
from strategies import build_strategy, columns

from . import _faults
from . import _regions as regions
from ._atomic import atomic_write, atomic_write_json, atomic_write_text
from ._config import Config, config_from_dict
from ._labeling import export_folder_tasks, mask_digest, read_answers, read_manifest, task_name
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
UNREADABLE_FILE = "unreadable.csv"
"""Train images left out because they do not decode (``data.skip_unreadable``): sample_id, image_path, error."""
TRAIN_SIGNALS_FILE = "train_signals.parquet"
VAL_PER_IMAGE_FILE = "val_per_image.parquet"
# Per-sample training signals of the round's model, written into the round's table revision.
TRAIN_LOSS = columns.TRAIN_LOSS
"""Mean pixel cross-entropy (nats) of a labeled sample under the round's best model."""
TRAIN_IOU = "train_iou"
"""IoU of a labeled sample under the round's best model: mean over the classes in the image."""


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


def train_spec(
    cfg: Config, data: Any, output_dir: str, seed: int, init_checkpoint: str | None = None
) -> Any:
    """The ``workers.TrainSpec`` for ``cfg`` on ``data`` (class names, ignore index and the train
    and val paths, weights and ids); shared by the loop's train phase and the training sweep."""
    t = cfg.train
    return workers.TrainSpec(
        model_name=cfg.model.name, model_options=dict(cfg.model.options),
        class_names=tuple(data["class_names"]), ignore_index=int(data["ignore_index"]),
        image_size=cfg.data.image_size,
        train_images=list(data["train_images"]), train_masks=list(data["train_masks"]),
        train_weights=list(data["train_weights"]),
        val_images=list(data["val_images"]), val_masks=list(data["val_masks"]),
        epochs=t.epochs, samples_per_epoch=t.samples_per_epoch or len(data["train_images"]),
        batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, seed=seed, output_dir=output_dir,
        use_gpu=t.use_gpu, train_ids=list(data["train_ids"]), val_ids=list(data["val_ids"]),
        loss=workers.LossSpec(**asdict(t.loss)), optimizer=t.optimizer, momentum=t.momentum,
        schedule=t.schedule, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, amp=t.amp,
        early_stopping_patience=t.early_stopping_patience, init_checkpoint=init_checkpoint,
        augment=workers.AugmentSpec(**asdict(t.augment)),
    )


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
            if isinstance(saved, dict):  # settings added since the experiment started keep their defaults
                with contextlib.suppress(ValueError, TypeError):
                    saved = config_from_dict(saved).to_dict()
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
        state = self.start()
        if state.stopped:
            return None
        start_round = state.round
        while state.round == start_round and not state.stopped:
            phase = state.next_phase()
            assert phase is not None
            t0 = time.perf_counter()
            _faults.checkpoint(f"{phase}:before")
            info = getattr(self, f"_phase_{phase}")(state)
            if info is None:  # waiting for people: this process has nothing more to do
                state.save(self.workdir)
                return None
            info["seconds"] = info.get("seconds", time.perf_counter() - t0)
            state.round_info[phase] = info
            state.phase = phase
            if phase == "track":
                self._finish_round(state)
            _faults.checkpoint(f"{phase}:after")
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
            "awaiting_labels": self._awaiting_summary(),
        }

    def _awaiting_summary(self) -> dict[str, Any] | None:
        request = self.awaiting_labels
        if request is None:
            return None
        missing = [i for i in request["requested"] if i not in request["received"]]
        return {"task_dir": request["task_dir"], "requested": len(request["requested"]),
                "received": len(request["received"]), "missing": missing}

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.tracking_uri or workers.default_tracking_uri(self.workdir)

    # ------------------------------------------------------------------ people in the loop

    @property
    def awaiting_labels(self) -> dict[str, Any] | None:
        """The open label request (task folder, requested and received ids), or None."""
        s = self.state
        if s is None or s.stopped or s.phase != "select":
            return None
        return s.round_info.get("label_request")

    def _require_state(self) -> State:
        if self.state is None:
            raise ValueError(f"no experiment has started in {self.workdir}")
        return self.state

    def _current_revision(self, state: State) -> str:
        request = state.round_info.get("label_request") if state.phase == "select" else None
        return str(request["revision"]) if request and request.get("revision") else state.revision

    def _round_table(self, state: State) -> pd.DataFrame:
        """The parent revision with this round's scores and training signals merged in."""
        return self._with_train_signals(self._with_scores(self.store.read(state.revision), state), state)

    def _preannotations(self, state: State, ids: list[str]) -> dict[str, np.ndarray]:
        """The round model's predicted class-id masks for ``ids``, at each image's own size."""
        if not self.config.oracle.preannotate or "train" not in state.round_info:
            return {}
        import cv2
        import torch

        if self.config.sam.enabled:  # SAM-refined masks, written next to the selection
            cfg = self.config
            self._ray()
            sam = workers.SamSpec.from_config(asdict(cfg.sam), cfg.sam.cache_uri or str(self.workdir / "sam_cache"))
            images = self.store.read(state.revision).set_index(SAMPLE_ID).loc[ids, IMAGE_PATH].astype(str)
            written = workers.sam_preannotate(
                list(ids), images.tolist(), [task_name(i) for i in ids], state.round_info["train"]["checkpoint_path"],
                cfg.data.image_size, sam, sam.checkpoint_id(), str(self._round_dir(state) / "sam_preannotations"),
                self._classes().ignore_index, sam_decoder=state.round_info.get("score", {}).get("sam_decoder"),
                num_actors=cfg.score.num_actors, cpus_per_actor=cfg.score.cpus_per_actor,
                gpus_per_actor=cfg.score.gpus_per_actor)
            refined = {}
            for sid, path in written.items():
                mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
                if mask is None:
                    raise FileNotFoundError(f"SAM pre-annotation {path} is missing or unreadable")
                refined[sid] = mask
            return refined

        model = workers.load_checkpoint(state.round_info["train"]["checkpoint_path"]).eval()
        paths = self.store.read(state.revision).set_index(SAMPLE_ID).loc[ids, IMAGE_PATH]
        h, w = self.config.data.image_size
        out = {}
        for sid, path in paths.items():
            image = workers.load_image(str(path))
            small = workers.load_image(str(path), size=(h, w))
            x = workers.to_tensor(small)[None]
            with torch.no_grad():
                pred = model(x).argmax(1)[0].numpy().astype(np.uint8)
            out[str(sid)] = cv2.resize(pred, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        return out

    def _human_label(self, state: State) -> dict[str, Any] | None:
        """Export the selection to people on first call; finish the phase once labels came in."""
        request = state.round_info.get("label_request")
        selected = list(state.round_info["select"]["selected"])
        if request is None:
            task_dir = self._round_dir(state) / "tasks"
            export_folder_tasks(
                self.store.read(state.revision), selected, task_dir, self._classes(),
                round_index=state.round, preannotations=self._preannotations(state, selected),
                label_studio=self.config.oracle.kind == "label-studio",
                image_root_url=self.config.oracle.image_root_url,
            )
            _faults.checkpoint("label:inside")  # task folder exported, request not yet recorded
            state.round_info["label_request"] = {
                "task_dir": str(task_dir), "requested": selected, "received": {}, "revision": None, "imports": [],
            }
            return None
        if not request["received"]:
            return None
        received = sorted(request["received"])
        return {"revision": request["revision"], "parent": state.revision, "added": received,
                "requested": len(request["requested"]), "partial": len(received) < len(request["requested"])}

    def import_labels(self, source: str | Path, task_dir: str | Path | None = None) -> dict[str, Any]:
        """Validate every mask in ``source`` (a folder of PNGs or a Label Studio JSON export) against
        the awaited selection (or the relabel task ``task_dir``) and add them in one step.

        A bad file raises ``ValueError`` naming it, and nothing is added. Masks already imported
        with the same content are skipped, so importing the same labels twice changes nothing.
        In a region run the awaited labels are regions (``orchestrator._regions.import_labels``).
        """
        state = self._require_state()
        request = self.awaiting_labels
        relabel = task_dir is not None
        if relabel:
            task = Path(task_dir).resolve()  # type: ignore[arg-type]
        elif request is not None:
            task = Path(request["task_dir"])
            if regions.is_region_run(self.config):  # answers count inside the asked regions only
                return regions.import_labels(self, state, request, source)
        else:
            raise ValueError(f"no labels are awaited in {self.workdir} (status: shoal status {self.workdir})")
        manifest = read_manifest(task)
        classes = self._classes()
        answers = read_answers(Path(source), manifest, classes, self.config.oracle.label_map)
        base = self._current_revision(state)
        df = self._round_table(state) if (request is not None and not request["revision"]) else self.store.read(base)
        received = request["received"] if (request is not None and not relabel) else {}
        if relabel:
            flagged = set(df.loc[df.get("needs_relabel", pd.Series(False, index=df.index)).fillna(False).astype(bool), SAMPLE_ID])
            outside = [a.sample_id for a in answers if a.sample_id not in flagged]
            if outside:
                raise ValueError(f"{outside[0]} is not waiting to be relabeled (shoal edit --relabel marks samples)")
        new = [a for a in answers if received.get(a.sample_id) != mask_digest(a.mask)]
        if relabel:
            current = df.set_index(SAMPLE_ID)[MASK_PATH]
            new = [a for a in new if not str(current.get(a.sample_id, "")).endswith(f"-{mask_digest(a.mask)}.png")]
        report = {"source": str(source), "found": len(answers), "added": [a.sample_id for a in new],
                  "unchanged": len(answers) - len(new), "revision": base}
        if not new:
            return report
        import cv2

        labels_dir = self.workdir / "labels" / (f"relabel-{task.name}" if relabel else f"round-{state.round:03d}")
        labels_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for a in new:
            path = labels_dir / f"{task_name(a.sample_id)}-{mask_digest(a.mask)}.png"
            if not path.exists():  # content-addressed: never overwritten
                png: bytes = cv2.imencode(".png", a.mask)[1].tobytes()
                atomic_write(path, partial(Path.write_bytes, data=png))
            paths[a.sample_id] = str(path)
        _faults.checkpoint("import:inside")  # mask files written, no revision yet
        idx = df[SAMPLE_ID].isin(paths)
        df.loc[idx, MASK_PATH] = df.loc[idx, SAMPLE_ID].map(paths)
        if relabel:
            df.loc[idx, "needs_relabel"] = False
        else:
            df.loc[idx, LABELED] = True
            df.loc[idx, ROUND_LABELED] = state.round
            df.loc[idx, WEIGHT] = df.loc[idx, WEIGHT].where(df.loc[idx, WEIGHT] > 0, 1.0)
            df = regions.charge_images(df, idx, classes, self.config)  # what drawing these masks costs, in clicks
        what = "relabel" if relabel else "labels"
        rev = self._unrecorded_revision(base, df) or self.store.write(
            df, parent=base, round=state.round, comment=f"import {what}: {len(new)} masks from {source}")
        report["revision"] = rev
        if request is not None:
            if not relabel:
                request["received"].update({a.sample_id: mask_digest(a.mask) for a in new})
                request["imports"].append({"source": str(source), "added": len(new), "revision": rev})
            request["revision"] = rev
        else:
            state.revision = rev
        _faults.checkpoint("import:after")  # revision written, state not saved
        state.save(self.workdir)
        return report

    def _unrecorded_revision(self, parent: str, df: pd.DataFrame) -> str | None:
        """The newest revision if a call killed before saving the state wrote exactly ``df`` on
        ``parent`` (no state names a child of ``parent``): a retry reuses it rather than fork the lineage."""
        latest = self.store.revisions()[-1]
        if latest == parent or self.store.info(latest).parent != parent:
            return None
        return latest if self.store.read(latest).equals(df.reset_index(drop=True)) else None

    def edit(self, *, weights: dict[str, float] | None = None, exclude: dict[str, bool] | None = None,
             relabel: list[str] | None = None, comment: str) -> str:
        """Apply a curation edit as a new table revision naming its parent and ``comment``.

        ``weights``: sample id -> weight (0 = kept but never drawn for training); ``exclude``: sample
        id -> excluded from training or restored; ``relabel``: labeled ids to send back to people
        (a task folder is written for interactive oracles). Returns the new revision id.
        """
        state = self._require_state()
        if state.phase not in ("",) and self.awaiting_labels is None:
            raise ValueError(f"edits apply between rounds or while labels are awaited; round {state.round} "
                             f"is after phase '{state.phase}': finish it with shoal resume first")
        if not comment.strip():
            raise ValueError("an edit needs a comment saying why (--comment)")
        base = self._current_revision(state)
        df = self.store.read(base)
        known = set(df.loc[df[SPLIT] == TRAIN_SPLIT, SAMPLE_ID])
        for what, ids in (("weights", weights or {}), ("exclude", exclude or {}), ("relabel", relabel or [])):
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise ValueError(f"{what}: unknown train sample id(s) {', '.join(map(str, unknown[:5]))}")
        for sid, w in (weights or {}).items():
            if not np.isfinite(w) or w < 0:
                raise ValueError(f"weights: sample {sid}: weight must be finite and >= 0, got {w}")
        if "excluded" not in df.columns:
            df["excluded"] = False
        if "needs_relabel" not in df.columns:
            df["needs_relabel"] = False
        index = df.set_index(SAMPLE_ID).index
        for sid, w in (weights or {}).items():
            df.loc[index.get_loc(sid), WEIGHT] = float(w)
        for sid, flag in (exclude or {}).items():
            row = index.get_loc(sid)
            df.loc[row, "excluded"] = bool(flag)
            df.loc[row, WEIGHT] = 0.0 if flag else (1.0 if df.loc[row, LABELED] else 0.0)
        if relabel:
            not_labeled = [i for i in relabel if not df.loc[index.get_loc(i), LABELED]]
            if not_labeled:
                raise ValueError(f"relabel: sample(s) {', '.join(not_labeled[:5])} are not labeled")
            df.loc[df[SAMPLE_ID].isin(relabel), "needs_relabel"] = True
        # an edit killed before it saved the state wrote this revision already: reuse it, no fork
        rev = self._unrecorded_revision(base, df) or self.store.write(
            df, parent=base, round=state.round, comment=f"edit: {comment}")
        _faults.checkpoint("edit:inside")  # the revision written, the state not saved
        if relabel and build_oracle(self.config.oracle.kind).interactive:
            export_folder_tasks(df, relabel, self.workdir / "relabel" / rev, self._classes(), round_index=state.round,
                                kind="relabel", label_studio=self.config.oracle.kind == "label-studio",
                                image_root_url=self.config.oracle.image_root_url)
        request = self.awaiting_labels
        if request is not None and request.get("revision"):
            request["revision"] = rev
        elif request is not None:
            state.revision = rev
        else:
            state.revision = rev
        state.save(self.workdir)
        return rev

    # ------------------------------------------------------------------ set-up

    def start(self) -> State:
        """Start the experiment if it has not started: check the data, build the sample table and
        label the initial set (no training); the state either way. A refused start leaves nothing."""
        if self.state is not None:
            return self.state
        existed = self.workdir.exists()
        try:
            return self._start()
        except BaseException:
            if not existed:  # a refused start leaves nothing behind
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _start(self) -> State:
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        table, classes = self._build_table()
        n_train = int((table[SPLIT] == TRAIN_SPLIT).sum())
        if cfg.loop.initial_labeled > n_train:
            raise ValueError(
                f"loop.initial_labeled: {cfg.loop.initial_labeled} exceeds the {n_train} train samples"
            )
        if cfg.loop.unit == "image" and cfg.loop.budget > n_train - cfg.loop.initial_labeled:
            raise ValueError(
                f"loop.budget: {cfg.loop.budget} samples per round exceeds the "
                f"{n_train - cfg.loop.initial_labeled} unlabeled samples left after the initial set"
            )
        if (table[SPLIT] == VAL_SPLIT).sum() == 0:
            raise ValueError("the validation split is empty: data.val_dir (or data.synthetic.num_val)")
        initial = self._initial_set(table)
        chosen = table[SAMPLE_ID].isin(initial)
        self._check_masks(table[chosen | (table[SPLIT] == VAL_SPLIT)], classes)
        table.loc[chosen, LABELED] = True
        table.loc[chosen, ROUND_LABELED] = 0
        table.loc[chosen, WEIGHT] = 1.0
        table = regions.prepare_table(table, chosen, classes, cfg)  # clicks of the initial set; region columns
        atomic_write_text(self.workdir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write_json(self.workdir / "classes.json", {"classes": list(classes.names), "ignore_index": classes.ignore_index})
        self._write_unreadable()
        how = "random" if cfg.loop.initial_strategy == "random" else "cold-start (colour features, k-center)"
        rev = self._unsaved_start(table) or self.store.write(
            table, parent=None, round=0, comment=f"initial: {len(initial)} {how} samples labeled"
        )
        _faults.checkpoint("start:inside")  # the first revision written, no state yet
        state = State(experiment_uid=uuid.uuid4().hex, revision=rev)
        state.save(self.workdir)
        self.state = state
        return state

    def _unsaved_start(self, table: pd.DataFrame) -> str | None:
        """The first revision of a start killed before it saved its state, if it holds exactly
        ``table``: the retry reuses it rather than write a second first revision."""
        revisions = self.store.revisions()
        if not revisions or self.store.info(revisions[-1]).parent is not None:
            return None
        return revisions[-1] if self.store.read(revisions[-1]).equals(table.reset_index(drop=True)) else None

    def _initial_set(self, table: pd.DataFrame) -> set[str]:
        """The ids labeled before round 1: at random, or spread over cheap colour features
        (``loop.initial_strategy: cold_start``, features computed in a Ray Data pass and kept in
        the table as ``feat_*`` columns)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.experiment.seed, 0])
        train_ids = np.sort(table.loc[table[SPLIT] == TRAIN_SPLIT, SAMPLE_ID].to_numpy())
        if cfg.loop.initial_strategy == "random":
            return set(rng.choice(train_ids, size=cfg.loop.initial_labeled, replace=False).tolist())
        self._ray()
        train = table[table[SPLIT] == TRAIN_SPLIT]
        images = self.workdir / "rounds" / "round-000" / "images.parquet"
        images.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(images, lambda p: train[[SAMPLE_ID, IMAGE_PATH]].to_parquet(p, index=False))
        result = workers.compute_features(str(images), str(images.parent / "features"), cpus_per_task=cfg.score.cpus_per_actor)
        features = workers.read_scores(result["features_dir"])
        for name in workers.FEATURE_COLUMNS:
            table[name] = table[SAMPLE_ID].map(features.set_index(SAMPLE_ID)[name])
        rows = table.loc[table[SPLIT] == TRAIN_SPLIT, [SAMPLE_ID, *workers.FEATURE_COLUMNS]].assign(**{LABELED: False})
        picked = build_strategy("cold_start").select(rows, cfg.loop.initial_labeled, rng)
        return set(picked)

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
        rows = self._without_unreadable(rows)
        if not any(r[SPLIT] == TRAIN_SPLIT for r in rows):
            raise ValueError("the train split is empty: data.train_dir (or data.synthetic.num_train)")
        table = pd.DataFrame(rows)
        table[ROUND_LABELED] = table[ROUND_LABELED].astype("int64")
        return table, classes

    def _without_unreadable(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` less the train (pool) images that do not decode, with ``data.skip_unreadable``
        (kept for :meth:`_write_unreadable`); without it the first one is an error naming the file.
        Decoded once, in threads (OpenCV releases the GIL); only the error strings are kept."""
        from concurrent.futures import ThreadPoolExecutor

        def problem(path: str) -> str | None:
            try:
                workers.load_image(path)
            except (ValueError, OSError) as exc:  # corrupt, truncated, empty, missing
                return str(exc)
            return None

        train = [r for r in rows if r[SPLIT] == TRAIN_SPLIT]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(problem, [str(r[IMAGE_PATH]) for r in train]))
        bad = [(r, p) for r, p in zip(train, problems) if p is not None]
        self._unreadable = pd.DataFrame({SAMPLE_ID: [r[SAMPLE_ID] for r, _ in bad],
                                         IMAGE_PATH: [r[IMAGE_PATH] for r, _ in bad], "error": [p for _, p in bad]})
        if not bad:
            return rows
        if not self.config.data.skip_unreadable:
            more = f" (and {len(bad) - 1} more unreadable train images)" if len(bad) > 1 else ""
            raise ValueError(f"{bad[0][1]}{more}; set data.skip_unreadable: true to leave unreadable pool images out")
        for r, p in bad:
            log.warning("data.skip_unreadable: pool image %s left out: %s", r[SAMPLE_ID], p)
        skipped = {r[SAMPLE_ID] for r, _ in bad}
        return [r for r in rows if r[SPLIT] != TRAIN_SPLIT or r[SAMPLE_ID] not in skipped]

    def _write_unreadable(self) -> None:
        """``<workdir>/unreadable.csv`` when :meth:`_without_unreadable` left images out."""
        unreadable = getattr(self, "_unreadable", None)
        if unreadable is not None and len(unreadable):
            atomic_write(self.workdir / UNREADABLE_FILE, lambda p: unreadable.to_csv(p, index=False))

    @staticmethod
    def _check_masks(rows: pd.DataFrame, classes: Any) -> None:
        """Decode the images and masks training starts from (the initial labeled set and the
        validation set): a corrupt file, a mask of the wrong size or a bad class id is refused now,
        naming the file, rather than failing inside a Ray worker later."""
        for image_path, mask_path in zip(rows[IMAGE_PATH], rows[MASK_PATH]):
            if not isinstance(mask_path, str):
                raise ValueError(f"labeled sample {image_path} has no mask")
            image = workers.load_image(str(image_path))
            workers.load_mask(mask_path, classes, expected_hw=image.shape[:2])

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
        workers.ensure_ray(self.config.ray.address, self.config.ray.num_cpus, self.config.ray.log_to_driver)

    # ------------------------------------------------------------------ phases

    def _phase_train(self, state: State) -> dict[str, Any]:
        cfg = self.config
        self._ray()
        df = self.store.read(state.revision)
        round_dir = self._round_dir(state)
        weights, weights_info = self._training_weights(state, df, round_dir)
        df = df.assign(**{WEIGHT: df[SAMPLE_ID].map(weights).fillna(0.0).astype(float)})
        labeled = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED] & (df[WEIGHT] > 0)]
        val = df[df[SPLIT] == VAL_SPLIT]
        classes = self._classes()
        data = {
            "class_names": tuple(classes.names), "ignore_index": classes.ignore_index,
            "train_images": labeled[IMAGE_PATH].tolist(), "train_masks": labeled[MASK_PATH].tolist(),
            "train_weights": labeled[WEIGHT].astype(float).tolist(), "train_ids": labeled[SAMPLE_ID].tolist(),
            "val_images": val[IMAGE_PATH].tolist(), "val_masks": val[MASK_PATH].tolist(),
            "val_ids": val[SAMPLE_ID].tolist(),
        }
        spec = train_spec(cfg, data, str(round_dir), seed=cfg.experiment.seed * 1000 + state.round,
                          init_checkpoint=self._init_checkpoint(state))
        result = workers.train(
            spec,
            num_workers=cfg.train.num_workers,
            cpus_per_worker=cfg.train.cpus_per_worker,
            max_failures=cfg.train.max_failures,
            storage_path=str(self.workdir / "ray_train"),
            run_name=f"round-{state.round:03d}-{uuid.uuid4().hex[:6]}",
        )
        _faults.checkpoint("train:inside")  # trained (model.pt written), per-sample tables not yet
        # The per-sample tables go to files in the round dir; the state file keeps their paths.
        signals = pd.DataFrame({SAMPLE_ID: result.train_ids, TRAIN_LOSS: result.train_loss, TRAIN_IOU: result.train_iou})
        signals_file = round_dir / TRAIN_SIGNALS_FILE
        atomic_write(signals_file, lambda p: signals.to_parquet(p, index=False))
        per_image_file = round_dir / VAL_PER_IMAGE_FILE
        per_image = pd.DataFrame(result.val_per_image)
        atomic_write(per_image_file, lambda p: per_image.to_parquet(p, index=False))
        info = asdict(result)
        for key in ("train_ids", "train_loss", "train_iou", "val_per_image"):
            info.pop(key)
        info["train_signals_file"] = str(signals_file)
        info["val_per_image_file"] = str(per_image_file)
        info["trained_on"] = len(labeled)
        info["seconds"] = result.train_seconds
        info["weights"] = weights_info
        return info

    def _training_weights(self, state: State, df: pd.DataFrame, round_dir: Path) -> tuple[pd.Series, dict[str, Any]]:
        """The weights this round trains with, by labeled train sample id, and a summary.

        The table's weight (1 when labeled, set by ``shoal edit``; 0 = excluded) times the
        ``loop.reweighting`` policy's weight, computed from the parent revision (which holds the
        previous round's per-sample loss and class shares), then the override file, applied last.
        Round 1 has no previous round: its policy weight is uniform. In region runs the weight is
        also proportional to the sample's labeled pixels (``regions.train_weighting``). Written to
        the round dir.
        """
        from strategies import compute_weights, manual_override

        rw = self.config.loop.reweighting
        rows = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED]]
        base = pd.Series(rows[WEIGHT].astype(float).to_numpy(), index=pd.Index(rows[SAMPLE_ID], name=SAMPLE_ID))
        policy = rw.policy if state.round > 1 else "uniform"
        factor = compute_weights(policy, rows, **(rw.options if policy == rw.policy else {}))
        weights = base * factor.reindex(base.index).fillna(1.0)
        if regions.is_region_run(self.config) and self.config.regions.train_weighting == "labeled_pixels":
            weights = weights * regions.pixel_weights(rows).reindex(weights.index)
        if rw.override_file:
            weights = manual_override(weights, self._weight_overrides(rw.override_file))
        elif len(weights) and not (weights > 0).any():
            raise ValueError("every labeled sample has weight 0: nothing to train on (see shoal edit --weights)")
        path = round_dir / "train_weights.csv"
        table = weights.rename(WEIGHT).reset_index()
        atomic_write(path, lambda p: table.to_csv(p, index=False))
        positive = weights[weights > 0]
        low = float(positive.min()) if len(positive) else float("nan")
        high = float(positive.max()) if len(positive) else float("nan")
        info = {"policy": policy, "file": str(path), "override_file": rw.override_file,
                "trained": int(len(positive)), "zero": int((weights == 0).sum()),
                "min": low, "max": high, "max_min_ratio": high / low}
        return weights, info

    @staticmethod
    def _weight_overrides(path: str) -> dict[str, float]:
        """``sample_id,weight`` rows of ``loop.reweighting.override_file``; a bad row is an error naming it."""
        try:
            table = pd.read_csv(path, dtype={SAMPLE_ID: str})
        except FileNotFoundError:
            raise FileNotFoundError(f"loop.reweighting.override_file: {path} does not exist") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"loop.reweighting.override_file: {path} is not a CSV ({exc})") from None
        if list(table.columns[:2]) != [SAMPLE_ID, WEIGHT]:
            raise ValueError(f"{path}: expected the header sample_id,weight, got {','.join(map(str, table.columns))}")
        duplicated = table[SAMPLE_ID][table[SAMPLE_ID].duplicated()]
        if len(duplicated):
            raise ValueError(f"{path}: sample_id {duplicated.iloc[0]!r} appears more than once")
        values = pd.to_numeric(table[WEIGHT], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.fillna(0.0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{path} row {row + 2}: weight {str(table[WEIGHT].iloc[row])!r} is not a finite number")
        return dict(zip(table[SAMPLE_ID], values.astype(float)))

    def _init_checkpoint(self, state: State) -> str | None:
        """The previous round's best checkpoint when ``train.init`` is ``previous`` (not in round 1)."""
        if self.config.train.init == "scratch" or state.round <= 1:
            return None
        path = self.workdir / "rounds" / f"round-{state.round - 1:03d}" / "model.pt"
        if not path.exists():
            raise FileNotFoundError(
                f"train.init is 'previous' but round {state.round - 1}'s checkpoint {path} is missing; "
                "restore it or set train.init: scratch"
            )
        return str(path)

    def _with_train_signals(self, df: pd.DataFrame, state: State) -> pd.DataFrame:
        """``df`` with this round's per-sample training signals (``train_loss``, ``train_iou``)
        replacing the parent revision's: NaN for samples the round's model was not trained on."""
        df = df.drop(columns=[c for c in (TRAIN_LOSS, TRAIN_IOU) if c in df.columns])
        path = state.round_info["train"].get("train_signals_file")
        if path is None:  # a round trained before the signals existed
            return df
        signals = pd.read_parquet(path, columns=[SAMPLE_ID, TRAIN_LOSS, TRAIN_IOU])
        return df.merge(signals, on=SAMPLE_ID, how="left", validate="one_to_one")

    def _strategy(self) -> Any:
        """The configured strategy, checked against what the scorer writes today."""
        if regions.is_region_run(self.config):
            return regions.region_strategy(self.config)
        strategy = build_strategy(self.config.loop.strategy, **self.config.loop.strategy_options)
        needs = strategy.requirements()
        written = set(workers.SCORED_COLUMNS) | set(workers.CLASSWEIGHTED_COLUMNS)
        prefixes = {columns.CLASS_FRACTION_PREFIX}
        if any(map(columns.is_sam_column, needs.columns | needs.column_prefixes)):
            if not self.config.sam.enabled:
                raise ValueError(
                    f"loop.strategy: '{self.config.loop.strategy}' reads SAM agreement columns; set sam.enabled: true "
                    f"and sam.checkpoint (the path to the official SAM weights of sam.model_type)"
                )
            written |= {c for c in needs.columns if columns.is_sam_column(c)}
            prefixes.add(columns.SAM_CLASS_PREFIX)
        if needs.mc_dropout_passes:  # the extended scoring pass runs them
            written.add(columns.BALD_MEAN)
        missing = sorted(needs.columns - written) + sorted(needs.column_prefixes - prefixes)
        if missing:
            raise ValueError(
                f"loop.strategy: '{self.config.loop.strategy}' needs {', '.join(missing)}, which the pool "
                f"scorer does not produce yet; choose one of the mean-uncertainty strategies or random"
            )
        return strategy

    def _phase_score(self, state: State) -> dict[str, Any]:
        """One Ray Data pass over the pool (uncertainty) and, with ``review.enabled``, over the
        labeled and validation images too (label review, quality and object columns)."""
        cfg = self.config
        if regions.is_region_run(cfg):  # every region of the open pool instead
            return regions.score(self, state)
        needs = self._strategy().requirements()
        review = cfg.review.enabled
        # SAM: the decoder is fine-tuned first (it serves this round's agreement and pre-annotations).
        reads_sam = any(map(columns.is_sam_column, needs.columns | needs.column_prefixes))
        sam = None
        if cfg.sam.enabled:
            sam = workers.SamSpec.from_config(asdict(cfg.sam), cfg.sam.cache_uri or str(self.workdir / "sam_cache"))
        sam_info: dict[str, Any] = {}
        if sam is not None and cfg.sam.finetune.enabled:
            self._ray()
            df = self.store.read(state.revision)
            lab = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED] & (df[WEIGHT] > 0) & df[MASK_PATH].notna()]
            tuned = workers.finetune_sam_decoder(
                sam, sam.checkpoint_id(), lab[SAMPLE_ID].tolist(), lab[IMAGE_PATH].tolist(), lab[MASK_PATH].tolist(),
                self._classes(), cfg.data.image_size, str(self._round_dir(state) / "sam_decoder.pt"),
                seed=cfg.experiment.seed * 1000 + state.round, cpus=cfg.score.cpus_per_actor, gpus=cfg.score.gpus_per_actor)
            log.info("round %d: SAM decoder held-out mask IoU %.3f -> %.3f", state.round,
                     tuned["val_iou_before"], tuned["val_iou_after"])
            sam_info = {"sam_decoder": tuned["decoder_path"], "sam_finetune": tuned}
        if not (needs.columns or needs.column_prefixes or review):
            return {"scores_dir": None, "num_scored": 0, "seconds": float(sam_info.get("sam_finetune", {}).get("seconds", 0.0)),
                    **sam_info}
        self._ray()
        df = self.store.read(state.revision)
        is_pool = (df[SPLIT] == TRAIN_SPLIT) & ~df[LABELED]
        rows = df if review else df[is_pool]
        quality = workers.QUALITY_COLUMNS
        batch = pd.DataFrame({
            SAMPLE_ID: rows[SAMPLE_ID],
            IMAGE_PATH: rows[IMAGE_PATH],
            # labeled and validation masks are reviewed; the pool's hidden masks are never read
            MASK_PATH: np.where(is_pool[rows.index], "", rows[MASK_PATH].fillna("").astype(str)),
            # quality columns describe the image alone: computed once, kept in later revisions
            "need_quality": (rows[quality[0]].isna() if quality[0] in rows else True),
        })
        # Strategies that need SAM or MC dropout get the extended pass (the same columns and more).
        score: Any = workers.score_pool
        round_dir = self._round_dir(state)
        if reads_sam or needs.mc_dropout_passes or needs.embeddings:
            batch[workers.POOL_FLAG] = is_pool[rows.index].to_numpy()
            score = partial(workers.score_pool_pass, spec=workers.PassSpec(
                sam=sam if reads_sam else None, sam_checkpoint_id=sam.checkpoint_id() if reads_sam and sam else None,
                sam_decoder=sam_info.get("sam_decoder"), mc_dropout_passes=needs.mc_dropout_passes, seed=cfg.experiment.seed,
                embeddings_dir=str(round_dir / "embeddings") if needs.embeddings else None))
        pool_file = round_dir / "pool.parquet"
        atomic_write(pool_file, lambda p: batch.to_parquet(p, index=False))
        classes = self._classes()
        result = score(
            str(pool_file),
            state.round_info["train"]["checkpoint_path"],
            cfg.data.image_size,
            str(round_dir / "scores"),
            num_actors=cfg.score.num_actors,
            batch_size=cfg.score.batch_size,
            cpus_per_actor=cfg.score.cpus_per_actor,
            gpus_per_actor=cfg.score.gpus_per_actor,
            class_names=tuple(classes.names),
            ignore_index=classes.ignore_index,
            # the classweighted aggregation weighs pixels by the rarity of their class in the labeled set
            labeled_class_shares=tuple(state.round_info["train"].get("class_pixel_frequency") or ()) or None,
        )
        _faults.checkpoint("score:inside")  # scores written, review reports not yet
        if result.num_scored != len(batch):
            raise RuntimeError(f"scoring returned {result.num_scored} rows for {len(batch)} images")
        info = {**asdict(result), **sam_info}
        info["seconds"] = result.seconds + float(sam_info.get("sam_finetune", {}).get("seconds", 0.0))
        pool_scores = workers.read_scores(result.scores_dir)
        pool_scores = pool_scores[pool_scores[SAMPLE_ID].isin(set(df.loc[is_pool, SAMPLE_ID]))]
        info["pool_uncertainty_mean"] = float(pool_scores[columns.ENTROPY_MEAN].mean()) if len(pool_scores) else None
        if review:
            info["quality_report"] = self._quality_report(state, Path(result.scores_dir), df)
            info["relabel_queue"] = self._relabel_queue(state, Path(result.scores_dir), df)
        return info

    def _relabel_queue(self, state: State, scores_dir: Path, df: pd.DataFrame) -> list[str]:
        """The ``review.relabel_top_k`` labeled samples most likely mislabeled, highest first; a task
        folder for people when the oracle is interactive (with ``review.simulate_relabel`` the
        simulated oracle answers the queue in the label phase)."""
        k = self.config.review.relabel_top_k
        if k <= 0:
            return []
        scores = workers.read_scores(str(scores_dir))
        labeled = set(df.loc[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED], SAMPLE_ID])
        ranked = scores[scores[SAMPLE_ID].isin(labeled)].sort_values(
            [workers.LABEL_ISSUE, SAMPLE_ID], ascending=[False, True], na_position="last")
        queue = ranked.head(k)
        path = self._round_dir(state) / "relabel_queue.csv"
        atomic_write(path, lambda p: queue[[SAMPLE_ID, workers.LABEL_ISSUE, "label_self_confidence"]].to_csv(p, index=False))
        ids = [str(i) for i in queue[SAMPLE_ID]]
        if ids and build_oracle(self.config.oracle.kind).interactive:
            export_folder_tasks(df, ids, self._round_dir(state) / "relabel", self._classes(), round_index=state.round,
                                kind="relabel", label_studio=self.config.oracle.kind == "label-studio",
                                image_root_url=self.config.oracle.image_root_url)
        return ids

    def _quality_report(self, state: State, scores_dir: Path, df: pd.DataFrame) -> str | None:
        """Which image properties relate to the model's per-image validation IoU (JSON in the round dir)."""
        per_image = state.round_info["train"].get("val_per_image_file")
        if not per_image or not Path(per_image).exists():
            return None
        iou = pd.read_parquet(per_image, columns=[SAMPLE_ID, "miou"])
        scores = workers.read_scores(str(scores_dir))
        merged = iou.merge(scores, on=SAMPLE_ID, how="inner")
        known = df.set_index(SAMPLE_ID)
        for col in workers.QUALITY_COLUMNS:  # computed in an earlier round: taken from the table
            if col in known.columns:
                merged[col] = merged[col].fillna(merged[SAMPLE_ID].map(known[col]))
        names = [*workers.QUALITY_COLUMNS, *(c for c in merged.columns if c.startswith(("label_objects_", "label_area_")))]
        report = workers.relate_to_iou({c: merged[c].to_numpy() for c in names if c in merged}, merged["miou"].to_numpy())
        ranked = dict(sorted(report.items(), key=lambda kv: -abs(kv[1]["mutual_information"])))
        path = self._round_dir(state) / "quality_vs_iou.json"
        atomic_write_json(path, {"round": state.round, "images": int(len(merged)), "columns": ranked})
        return str(path)

    def _scores(self, state: State) -> pd.DataFrame | None:
        scores_dir = state.round_info["score"]["scores_dir"]
        return None if scores_dir is None else workers.read_scores(scores_dir)

    def _with_scores(self, df: pd.DataFrame, state: State) -> pd.DataFrame:
        """``df`` with this round's score columns; quality columns not recomputed keep their values."""
        scores = self._scores(state)
        if scores is None:
            return df
        cols = [c for c in scores.columns if c != SAMPLE_ID]
        previous = df.set_index(SAMPLE_ID)[[c for c in workers.QUALITY_COLUMNS if c in df.columns]]
        df = df.drop(columns=[c for c in cols if c in df.columns]).merge(scores, on=SAMPLE_ID, how="left", validate="one_to_one")
        for col in previous.columns:
            df[col] = df[col].fillna(df[SAMPLE_ID].map(previous[col]))
        queue = state.round_info["score"].get("relabel_queue") or []
        if queue:
            if "needs_relabel" not in df.columns:
                df["needs_relabel"] = False
            df["needs_relabel"] = df["needs_relabel"].fillna(False).astype(bool) | df[SAMPLE_ID].isin(queue)
        return df

    def _candidates(self, state: State) -> pd.DataFrame:
        """The train rows with this round's scores: the unlabeled pool to select from and, flagged
        ``labeled``, the labeled rows (context for diversity and class balance); excluded samples
        are neither."""
        df = self.store.read(state.revision)
        keep = df[SPLIT] == TRAIN_SPLIT
        if "excluded" in df.columns:
            keep &= ~df["excluded"].fillna(False).astype(bool)
        table = df.loc[keep, [SAMPLE_ID, LABELED]].reset_index(drop=True)
        table[LABELED] = table[LABELED].astype(bool)
        scores = self._scores(state)
        if scores is None:
            return table
        return table.merge(scores, on=SAMPLE_ID, how="left", validate="one_to_one")

    def _embeddings(self, state: State, table: pd.DataFrame) -> np.ndarray | None:
        """The pooled encoder embeddings of ``table``'s rows, when the strategy declared them."""
        path = state.round_info["score"].get("embeddings_dir")
        if not self._strategy().requirements().embeddings or not path:
            return None
        return workers.read_embeddings(path, table[SAMPLE_ID].tolist())

    def _phase_select(self, state: State) -> dict[str, Any]:
        cfg = self.config
        if regions.is_region_run(cfg):  # regions under a click budget
            return regions.select(self, state)
        t0 = time.perf_counter()
        table = self._candidates(state)
        strategy = self._strategy()
        budget = min(cfg.loop.budget, int((~table[LABELED]).sum()))
        rng = np.random.default_rng([cfg.experiment.seed, state.round, 1])
        selected = strategy.select(table, budget, rng, self._embeddings(state, table))
        seconds = time.perf_counter() - t0
        candidates = table[~table[LABELED]].drop(columns=[LABELED])
        chosen = candidates.set_index(SAMPLE_ID).loc[selected].reset_index()
        chosen.insert(0, "rank", np.arange(1, len(chosen) + 1))
        path = self._round_dir(state) / "selection.csv"
        atomic_write(path, lambda p: chosen.to_csv(p, index=False))
        _faults.checkpoint("select:inside")  # selection.csv written
        return {"selected": selected, "selection_file": str(path), "seconds": seconds}

    def _phase_label(self, state: State) -> dict[str, Any] | None:
        cfg = self.config
        if regions.is_region_run(cfg):  # regions into partial masks, by the simulated oracle or people
            return regions.label(self, state)
        selected = state.round_info["select"]["selected"]
        if build_oracle(cfg.oracle.kind).interactive:
            return self._human_label(state)
        latest_info = self.store.info(self.store.revisions()[-1])
        parent = state.revision
        oracle = build_oracle(cfg.oracle.kind)
        # Written by this phase before an interruption (the labels, then maybe the relabel answers):
        # reuse them rather than fork the lineage.
        answered = None
        if latest_info.round == state.round and latest_info.comment.startswith("relabel:") and latest_info.parent:
            answered, latest_info = latest_info.id, self.store.info(latest_info.parent)
        if latest_info.parent == parent and latest_info.round == state.round:
            rev = latest_info.id
        else:
            answered = None
            df = self.store.read(parent)
            masks = oracle.label(df, selected)
            _faults.checkpoint("label:inside")  # masks revealed, revision not yet written
            df = self._with_train_signals(self._with_scores(df, state), state)
            idx = df[SAMPLE_ID].isin(selected)
            df.loc[idx, LABELED] = True
            df.loc[idx, ROUND_LABELED] = state.round
            df.loc[idx, WEIGHT] = 1.0
            df.loc[idx, MASK_PATH] = df.loc[idx, SAMPLE_ID].map(masks)
            df = regions.charge_images(df, idx, self._classes(), cfg)  # clicks and labeled pixels, for the click axis
            rev = self.store.write(
                df, parent=parent, round=state.round,
                comment=f"round {state.round}: +{len(selected)} by {cfg.loop.strategy}",
            )
        out: dict[str, Any] = {"revision": rev, "parent": parent, "added": selected}
        if not cfg.review.simulate_relabel:
            return out
        # review.simulate_relabel: the oracle answers the relabel requests (this round's queue and
        # `shoal edit --relabel`) with ground truth: the mask the dataset came with, i.e. the
        # sample's mask_path in the experiment's first revision (later revisions may point at
        # imported or corrupted copies).
        df = self.store.read(rev)
        flagged = df[LABELED] & df.get("needs_relabel", pd.Series(False, index=df.index)).fillna(False).astype(bool)
        ids = sorted(df.loc[flagged, SAMPLE_ID].astype(str))
        if not ids:
            return out
        truth = oracle.label(self.store.read(self.store.lineage(rev)[-1].id), ids)
        current = df.set_index(SAMPLE_ID)[MASK_PATH]
        changed = [i for i in ids if current[i] != truth[i]]
        if answered is None:
            df.loc[flagged, MASK_PATH] = df.loc[flagged, SAMPLE_ID].map(truth)
            df.loc[flagged, "needs_relabel"] = False
            answered = self.store.write(
                df, parent=rev, round=state.round,
                comment=f"relabel: {len(ids)} flagged samples answered by the simulated oracle with ground truth, "
                        f"{len(changed)} masks changed (parent {rev})",
            )
        return {**out, "revision": answered, "relabeled": ids, "relabel_changed": changed, "relabel_parent": rev}

    def _phase_track(self, state: State) -> dict[str, Any]:
        from . import _report as report

        cfg = self.config
        tracker = self._tracker_()
        classes = self._classes()
        tags = report.experiment_tags(cfg)
        if state.parent_run_id is None:
            state.parent_run_id = tracker.parent_run(
                state.experiment_uid, cfg.experiment.name, tags={"shoal.workdir": str(self.workdir), **tags},
            )
            tracker.log(state.parent_run_id, params=cfg.flat())
            _faults.checkpoint("track:parent")
            state.save(self.workdir)
        info = state.round_info
        train, label = info["train"], info["label"]
        round_dir = self._round_dir(state)
        child = tracker.round_run(state.experiment_uid, state.parent_run_id, state.round, tags=tags)
        df = self.store.read(label["revision"])
        labeled_after = self.store.info(label["revision"]).num_labeled
        previous_dir = self.workdir / "rounds" / f"round-{state.round - 1:03d}" if state.round > 1 else None
        pixels = report.labeled_pixels(df, classes, round_dir, previous_dir)
        metrics = self._round_metrics(state, classes.names, labeled_after, pixels)
        curve = report.learning_curve(
            state.history, (state.round, int(train["trained_on"]), float(train["val_miou"]), labeled_after))
        auc = workers.learning_curve_auc(curve["trained_on"], curve["val_miou"])
        baseline = None
        if cfg.loop.strategy != "random":
            found = tracker.experiment_runs(
                {workers.TAG_STRATEGY: "random", workers.TAG_DATASET: tags[workers.TAG_DATASET]},
                exclude=[state.parent_run_id])
            if found:
                baseline = tracker.curve(found[0], "trained_on", "val_miou")
                tracker.log(child, tags={"shoal.baseline_run_id": found[0]})
        selection = report.selection_with_reasons(
            pd.read_csv(info["select"]["selection_file"], dtype={SAMPLE_ID: str}), self._strategy(),
            (table := self._candidates(state)), len(info["select"]["selected"]),
            np.random.default_rng([cfg.experiment.seed, state.round, 1]),  # the select phase's generator
            self._embeddings(state, table))
        artifacts = report.write_round_report(
            round_dir / report.REPORT_DIR, cfg=cfg, classes=classes, round_index=state.round, curve=curve,
            baseline=baseline, train=train, pixels=pixels, revision_df=df, selection=selection,
            sam_dir=round_dir / "sam_preannotations",  # where _preannotations has SAM write them
            sam_finetune=info["score"].get("sam_finetune"))
        # SAM's mask decoder, fine-tuned in the score phase: its held-out mask IoU before and after
        # tuning says whether tuning helped (steps run, not configured: 0 without labeled prompts).
        tuned = info["score"].get("sam_finetune") or {}
        sam_metrics = {name: float(tuned[key]) for name, key in (
            ("sam_decoder_holdout_iou_before", "val_iou_before"), ("sam_decoder_holdout_iou_after", "val_iou_after"),
            ("sam_decoder_finetune_seconds", "seconds")) if key in tuned}
        sam_params = {name: int(tuned[key]) for name, key in (
            ("sam_decoder_finetune_steps", "steps"), ("sam_decoder_holdout_images", "holdout_images"),
            ("sam_decoder_holdout_prompts", "holdout_prompts")) if key in tuned}
        if "relabeled" in label:  # review.simulate_relabel: what the simulated oracle answered
            metrics |= {"relabeled": float(len(label["relabeled"])),
                        "relabel_masks_changed": float(len(label["relabel_changed"]))}
        metrics |= sam_metrics
        tracker.log(child, params=report.round_params(cfg, state.round, label["revision"], label["parent"]) | sam_params,
                    metrics=metrics, step=state.round)
        _faults.checkpoint("track:inside")  # the round's child run exists, not finished
        for epoch in train["history"]:
            tracker.log(child, metrics={"epoch_val_miou": epoch["val_miou"], "epoch_train_loss": epoch["train_loss"]},
                        step=int(epoch["epoch"]))
        lineage = [asdict(i) for i in self.store.lineage(label["revision"])]
        lineage_file = round_dir / "revision.json"
        atomic_write_json(lineage_file, {"revision": label["revision"], "parent": label["parent"], "lineage": lineage})
        extra = [lineage_file, *(p for p in [self.workdir / UNREADABLE_FILE] if p.exists())]
        for key in ("quality_report",):  # which image properties relate to per-image val IoU
            path = info["score"].get(key)
            if path and Path(path).exists():
                extra.append(Path(path))
                columns = json.loads(Path(path).read_text())["columns"]
                tracker.log(child, metrics={
                    f"quality_mi_{name}": v["mutual_information"] for name, v in list(columns.items())[:10]
                } | {f"quality_corr_{name}": v["pearson"] for name, v in list(columns.items())[:10]}, step=state.round)
        queue = Path(self._round_dir(state)) / "relabel_queue.csv"
        if queue.exists():
            extra.append(queue)
        tracker.log_artifacts(child, [*artifacts.root, *extra])
        tracker.log_artifacts(child, artifacts.figures, "figures")
        tracker.log_artifacts(child, artifacts.tables, "tables")
        tracker.finish(child)
        # The parent holds the summary so far: the curve (replaced every round) and its area.
        tracker.log(state.parent_run_id, metrics={
            "val_miou": metrics["val_miou"], "trained_on": metrics["trained_on"], "labeled_count": labeled_after,
            "learning_curve_auc": auc, **{k: v for k, v in sam_metrics.items() if "_iou_" in k},
        }, step=state.round)
        curve_files = [p for p in (*artifacts.figures, *artifacts.tables) if p.stem == "learning_curve"]
        tracker.log_artifacts(state.parent_run_id, curve_files)
        return {"child_run_id": child, "metrics": metrics, "learning_curve_auc": auc}

    def _round_metrics(
        self, state: State, names: tuple[str, ...], labeled_after: int, pixels: pd.DataFrame | None = None
    ) -> dict[str, float]:
        """The round's metrics: validation scores of its model (per class too), labeled count and
        labeled pixels per class (``pixels``: one row per labeled sample, ``pixels_<class>``
        columns) and phase timings. Missing values are NaN (MLflow skips them)."""
        from . import _report as report

        info = state.round_info
        train = info["train"]
        nan = float("nan")
        metrics = {
            "val_miou": train["val_miou"],
            "val_pixel_accuracy": train["val_pixel_accuracy"],
            "val_mean_dice": float(train.get("val_mean_dice", nan)),
            "val_fw_iou": float(train.get("val_fw_iou", nan)),
            "val_image_miou": float(train.get("val_image_miou", nan)),
            "trained_on": float(train["trained_on"]),
            "labeled_count": float(labeled_after),
            "selected": float(len(info["select"]["selected"])),
            "added": float(len(info["label"].get("added", info["select"]["selected"]))),
            "train_seconds": info["train"]["seconds"],
            "score_seconds": info["score"]["seconds"],
            "select_seconds": info["select"]["seconds"],
            "label_seconds": info["label"]["seconds"],
        }
        weights = train.get("weights") or {}
        for key in ("min", "max", "max_min_ratio", "zero"):
            if key in weights:
                metrics[f"train_weight_{key}"] = float(weights[key])
        if info["score"].get("pool_uncertainty_mean") is not None:
            metrics["pool_uncertainty_mean"] = float(info["score"]["pool_uncertainty_mean"])
        for name, iou in zip(names, train["val_iou_per_class"]):
            metrics[f"val_iou_{name}"] = iou
        for name, dice in zip(names, report.dice_per_class(train, len(names))):
            metrics[f"val_dice_{name}"] = dice
        if pixels is not None:
            for name in names:
                metrics[f"labeled_pixels_{name}"] = float(pixels[f"{report.PIXELS_PREFIX}{name}"].sum())
        metrics |= regions.click_metrics(self.store, info["label"])  # labeled_clicks, round_clicks, ...
        return metrics

    def _stop_decision(self, state: State, pool_left: int) -> str | None:
        """The reason ``loop.stopping`` gives to stop after this round (its history included), or None."""
        from strategies import stopping_rule

        stop = self.config.loop.stopping
        history = [{"labeled_count": h["labeled_count"], "val_miou": h["metrics"].get("val_miou"),
                    "pool_uncertainty_mean": h["extra"].get("pool_uncertainty_mean"), "pool_size": None}
                   for h in state.history]
        history[-1]["pool_size"] = pool_left
        rule = stopping_rule(total_budget=stop.total_budget, plateau_rounds=stop.plateau_rounds,
                             min_delta=stop.min_delta, uncertainty_threshold=stop.uncertainty_threshold)
        decision = rule(history)
        return decision.reason if decision.stop else None

    def _finish_round(self, state: State) -> None:
        cfg = self.config
        info = state.round_info
        labeled_after = self.store.info(info["label"]["revision"]).num_labeled
        # The track phase computed them (with the labeled pixels); rounds tracked before it did not.
        metrics = info["track"].get("metrics") or self._round_metrics(state, self._classes().names, labeled_after)
        timings = {p: float(info[p]["seconds"]) for p in ("train", "score", "select", "label", "track")}
        result = RoundResult(
            round=state.round, added=list(info["label"]["added"]), trained_on=int(info["train"]["trained_on"]),
            labeled_count=labeled_after, metrics=metrics, timings=timings, revision=info["label"]["revision"],
            strategy=cfg.loop.strategy, extra={"child_run_id": info["track"]["child_run_id"],
                                               "pool_uncertainty_mean": info["score"].get("pool_uncertainty_mean"),
                                               **regions.round_extra(metrics)},
        )
        state.history.append(asdict(result))
        state.revision = info["label"]["revision"]
        df = self.store.read(state.revision)
        pool_left = int(regions.open_pool(df).sum())  # region runs: images labeled in part are not done
        if state.round >= cfg.loop.rounds:
            state.stopped = f"rounds: {state.round} of {cfg.loop.rounds} done"
        elif pool_left == 0:
            state.stopped = "pool exhausted: every train sample is labeled"
        else:
            state.stopped = self._stop_decision(state, pool_left)
        if state.stopped:
            tracker = self._tracker_()
            assert state.parent_run_id is not None
            tracker.log(state.parent_run_id, metrics={
                "final_val_miou": metrics["val_miou"], "rounds": float(state.round),
                "final_learning_curve_auc": info["track"].get("learning_curve_auc", float("nan"))},
                tags={"shoal.stopped": state.stopped})
            # The last round's best model, once per experiment, in a format the registry takes.
            model = workers.load_checkpoint(info["train"]["checkpoint_path"]).eval()
            height, width = cfg.data.image_size
            tracker.log_pytorch_model(state.parent_run_id, model, np.zeros((2, 3, height, width), np.float32))
            tracker.finish(state.parent_run_id)
        state.round += 1
        state.phase = ""
        state.round_info = {}
