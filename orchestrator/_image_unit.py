"""Whole images as the labeling unit (``loop.unit: image``): ``loop.budget`` images per round.

The score phase runs one Ray Data pass over the unlabeled pool (and, with ``review.enabled``, the
labeled and validation images: label review, quality and object columns) writing exactly the
columns the strategy declares; the strategy (``strategies.Strategy``) picks ``budget`` images from
the per-image score table; the simulated oracle reveals their masks, or people draw them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import workers
from strategies import Strategy, build_strategy, columns

from . import _faults
from . import _score as review
from ._atomic import atomic_write
from ._clicks import charge_images
from ._config import Config
from ._context import Context
from ._label_state import mark_labeled
from ._labeling import export_folder_tasks, mask_digest, read_answers, read_manifest, save_answers, write_back
from ._oracle import build_oracle
from ._round import (
    current_revision,
    open_request,
    preannotations,
    round_table,
    unrecorded_revision,
    written_this_round,
)
from ._table import IMAGE_PATH, LABELED, MASK_PATH, SAMPLE_ID, SPLIT, TRAIN_SPLIT, WEIGHT, flag

log = logging.getLogger(__name__)


class ImageUnit:
    """An :class:`~orchestrator._context.AcquisitionUnit` labeling whole images."""

    name = "image"

    def __init__(self, config: Config, strategy: Strategy | None = None) -> None:
        self.config = config
        self.strategy: Strategy = strategy or build_strategy(config.loop.strategy, **config.loop.strategy_options)

    # -- start ------------------------------------------------------------------------------------

    def check(self, config: Config) -> None:
        """The strategy's declared needs against what the pool scorer writes (SAM columns need
        ``sam.enabled``; MC-dropout passes write ``bald_mean``)."""
        needs = self.strategy.requirements()
        written = set(workers.SCORED_COLUMNS) | set(workers.CLASSWEIGHTED_COLUMNS)
        prefixes = {columns.CLASS_FRACTION_PREFIX}
        if any(map(columns.is_sam_column, needs.columns | needs.column_prefixes)):
            if not config.sam.enabled:
                raise ValueError(
                    f"loop.strategy: '{config.loop.strategy}' reads SAM agreement columns; set sam.enabled: true "
                    f"and sam.checkpoint (the path to the official SAM weights of sam.model_type)"
                )
            written |= {c for c in needs.columns if columns.is_sam_column(c)}
            prefixes.add(columns.SAM_CLASS_PREFIX)
        if needs.mc_dropout_passes:  # the extended scoring pass runs them
            written.add(columns.BALD_MEAN)
        missing = sorted(needs.columns - written) + sorted(needs.column_prefixes - prefixes)
        if missing:
            raise ValueError(
                f"loop.strategy: '{config.loop.strategy}' needs {', '.join(missing)}, which the pool "
                f"scorer does not produce yet; choose one of the mean-uncertainty strategies or random"
            )

    def check_pool(self, n_unlabeled: int) -> None:
        if self.config.loop.budget > n_unlabeled:
            raise ValueError(
                f"loop.budget: {self.config.loop.budget} samples per round exceeds the "
                f"{n_unlabeled} unlabeled samples left after the initial set"
            )

    def prepare_table(self, table: pd.DataFrame) -> pd.DataFrame:
        return table

    def initial_labels(self, ctx: Context, table: pd.DataFrame, classes: Any) -> tuple[pd.DataFrame, str] | None:
        return None

    def open_pool(self, df: pd.DataFrame) -> pd.Series:
        return (df[SPLIT] == TRAIN_SPLIT) & ~df[LABELED].astype(bool)

    def weight_factors(self, rows: pd.DataFrame) -> pd.Series | None:
        return None

    # -- score ------------------------------------------------------------------------------------

    def score(self, ctx: Context) -> dict[str, Any]:
        """One Ray Data pass over the pool (uncertainty) and, with ``review.enabled``, over the
        labeled and validation images too (label review, quality and object columns)."""
        cfg = ctx.config
        state = ctx.round_state
        needs = self.strategy.requirements()
        review_on = cfg.review.enabled
        # SAM: the decoder is fine-tuned first (it serves this round's agreement and pre-annotations).
        reads_sam = any(map(columns.is_sam_column, needs.columns | needs.column_prefixes))
        sam = ctx.sam_spec() if cfg.sam.enabled else None
        sam_info: dict[str, Any] = {}
        if sam is not None and cfg.sam.finetune.enabled:
            ctx.ray()
            df = ctx.read(state.revision)
            lab = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED] & (df[WEIGHT] > 0) & df[MASK_PATH].notna()]
            tuned = workers.finetune_sam_decoder(
                sam, sam.checkpoint_id(), lab[SAMPLE_ID].tolist(), lab[IMAGE_PATH].tolist(), lab[MASK_PATH].tolist(),
                ctx.classes(), cfg.data.image_size, str(ctx.round_dir() / "sam_decoder.pt"),
                seed=cfg.experiment.seed * 1000 + state.round, cpus=cfg.score.cpus_per_actor, gpus=cfg.score.gpus_per_actor)
            log.info("round %d: SAM decoder held-out mask IoU %.3f -> %.3f", state.round,
                     tuned["val_iou_before"], tuned["val_iou_after"])
            sam_info = {"sam_decoder": tuned["decoder_path"], "sam_finetune": tuned}
        finetune_seconds = float(sam_info.get("sam_finetune", {}).get("seconds", 0.0))
        if not (needs.columns or needs.column_prefixes or review_on):
            return {"scores_dir": None, "num_scored": 0, "seconds": finetune_seconds, **sam_info}
        ctx.ray()
        df = ctx.read(state.revision)
        is_pool = (df[SPLIT] == TRAIN_SPLIT) & ~df[LABELED]
        rows = df if review_on else df[is_pool]
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
        round_dir = ctx.round_dir()
        if reads_sam or needs.mc_dropout_passes or needs.embeddings:
            batch[workers.POOL_FLAG] = is_pool[rows.index].to_numpy()
            score = partial(workers.score_pool_pass, spec=workers.PassSpec(
                sam=sam if reads_sam else None, sam_checkpoint_id=sam.checkpoint_id() if reads_sam and sam else None,
                sam_decoder=sam_info.get("sam_decoder"), mc_dropout_passes=needs.mc_dropout_passes, seed=cfg.experiment.seed,
                embeddings_dir=str(round_dir / "embeddings") if needs.embeddings else None))
        pool_file = round_dir / "pool.parquet"
        atomic_write(pool_file, lambda p: batch.to_parquet(p, index=False))
        classes = ctx.classes()
        ctx.expect("score", len(batch))
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
            progress_dir=ctx.progress_dir("score"),
            name=ctx.job_name("score"),
        )
        _faults.checkpoint("score:inside")  # scores written, review reports not yet
        if result.num_scored != len(batch):
            raise RuntimeError(f"scoring returned {result.num_scored} rows for {len(batch)} images")
        info = {**asdict(result), **sam_info}
        info["seconds"] = result.seconds + finetune_seconds
        pool_scores = workers.read_scores(result.scores_dir)
        pool_scores = pool_scores[pool_scores[SAMPLE_ID].isin(set(df.loc[is_pool, SAMPLE_ID]))]
        info["pool_uncertainty_mean"] = float(pool_scores[columns.ENTROPY_MEAN].mean()) if len(pool_scores) else None
        if review_on:
            info["quality_report"] = review.quality_report(ctx, Path(result.scores_dir), df)
            info["relabel_queue"] = review.relabel_queue(ctx, Path(result.scores_dir), df)
        return info

    # -- select -----------------------------------------------------------------------------------

    def candidates(self, ctx: Context) -> pd.DataFrame:
        """The train rows with the score columns this round's strategy declares (read from disk
        alone: the driver's memory grows with the pool only by those): the unlabeled pool to select
        from and, flagged ``labeled``, the labeled rows (context for diversity and class balance);
        excluded samples are neither."""
        df = ctx.read(ctx.round_state.revision)
        keep = (df[SPLIT] == TRAIN_SPLIT) & ~flag(df, "excluded")
        table = df.loc[keep, [SAMPLE_ID, LABELED]].reset_index(drop=True)
        table[LABELED] = table[LABELED].astype(bool)
        scores_dir = ctx.round_state.round_info.get("score", {}).get("scores_dir")
        if scores_dir is None:
            return table
        needs = self.strategy.requirements()
        found = workers.read_scores(scores_dir, columns=needs.columns,
                                    prefixes=needs.column_prefixes | needs.optional_column_prefixes)
        return table.merge(found, on=SAMPLE_ID, how="left", validate="one_to_one")

    def embeddings(self, ctx: Context, table: pd.DataFrame) -> np.ndarray | None:
        """The pooled encoder embeddings of ``table``'s rows, when the strategy declared them."""
        path = ctx.round_state.round_info["score"].get("embeddings_dir")
        if not self.strategy.requirements().embeddings or not path:
            return None
        return workers.read_embeddings(path, table[SAMPLE_ID].tolist())

    def select(self, ctx: Context, rng: np.random.Generator) -> tuple[dict[str, Any], pd.DataFrame]:
        """``loop.budget`` images (fewer when the pool holds fewer) by the strategy, with the scores
        it read and its priority and reason for each."""
        table = self.candidates(ctx)
        budget = min(self.config.loop.budget, int((~table[LABELED]).sum()))
        picked = self.strategy.select_with_reasons(table, budget, rng, self.embeddings(ctx, table))
        selected = [str(s) for s in picked[SAMPLE_ID]]
        chosen = pd.DataFrame({SAMPLE_ID: selected})
        scores_dir = ctx.round_state.round_info.get("score", {}).get("scores_dir")
        if scores_dir is not None:  # every score of the picks (a budget's worth of rows) for the report
            found = workers.read_scores(scores_dir, sample_ids=selected)
            chosen = chosen.merge(found, on=SAMPLE_ID, how="left", validate="one_to_one")
        chosen.insert(0, "rank", np.arange(1, len(chosen) + 1))
        chosen["priority"] = picked["priority"].to_numpy()
        chosen["reason"] = picked["reason"].to_numpy()
        return {"selected": selected}, chosen

    # -- label ------------------------------------------------------------------------------------

    def label(self, ctx: Context) -> dict[str, Any]:
        """The simulated oracle reveals the selected images' masks; one new revision (reused when an
        interrupted attempt wrote it already)."""
        cfg = ctx.config
        state = ctx.round_state
        selected = state.round_info["select"]["selected"]
        parent = state.revision
        rev, _ = written_this_round(ctx, parent)
        if rev is None:
            df = ctx.read(parent)
            masks = build_oracle(cfg.oracle.kind).label(df, selected)
            _faults.checkpoint("label:inside")  # masks revealed, revision not yet written
            df = round_table(ctx, df)
            idx = df[SAMPLE_ID].isin(selected)
            mark_labeled(df, idx, round_index=state.round, config=cfg, mask_paths=masks)
            df = charge_images(df, idx, ctx.classes(), cfg)  # clicks and labeled pixels, for the click axis
            rev = ctx.store.write(df, parent=parent, round=state.round,
                                  comment=f"round {state.round}: +{len(selected)} by {cfg.loop.strategy}")
        return {"revision": rev, "parent": parent, "added": selected}

    def request_labels(self, ctx: Context) -> dict[str, Any] | None:
        """Export the selection to people on first call; finish the phase once labels came in."""
        state = ctx.round_state
        request = state.round_info.get("label_request")
        selected = list(state.round_info["select"]["selected"])
        if request is None:
            task_dir = ctx.round_dir() / "tasks"
            export_folder_tasks(
                ctx.read(state.revision), selected, task_dir, ctx.classes(),
                round_index=state.round, preannotations=preannotations(ctx, selected),
                label_studio=ctx.label_studio(), workdir=ctx.workdir,
            )
            _faults.checkpoint("label:inside")  # task folder exported, request not yet recorded
            open_request(state, task_dir, selected)
            return None
        if not request["received"]:
            return None
        received = sorted(request["received"])
        return {"revision": request["revision"], "parent": state.revision, "added": received,
                "requested": len(request["requested"]), "partial": len(received) < len(request["requested"])}

    def import_answers(self, ctx: Context, request: dict[str, Any], source: Path) -> dict[str, Any]:
        """Whole masks for the requested images (a folder of PNGs or a Label Studio export), added in
        one revision; a mask imported before with the same content is skipped."""
        cfg = ctx.config
        state = ctx.round_state
        classes = ctx.classes()
        manifest = read_manifest(Path(request["task_dir"]))
        answers = read_answers(source, manifest, classes, cfg.oracle.label_map)
        base = current_revision(state)
        df = round_table(ctx) if not request["revision"] else ctx.read(base)
        received = request["received"]
        new = [a for a in answers if received.get(a.sample_id) != mask_digest(a.mask)]
        report = {"source": str(source), "found": len(answers), "added": [a.sample_id for a in new],
                  "unchanged": len(answers) - len(new), "revision": base}
        if not new:
            return report
        paths = save_answers(new, ctx.workdir / "labels" / f"round-{state.round:03d}")
        if cfg.data.write_back_masks:  # the pool folder stays the dataset of record
            write_back(new, df.set_index(SAMPLE_ID)[IMAGE_PATH].astype(str).to_dict())
        _faults.checkpoint("import:inside")  # mask files written, no revision yet
        idx = df[SAMPLE_ID].isin(paths)
        mark_labeled(df, idx, round_index=state.round, config=cfg, mask_paths=paths)
        df = charge_images(df, idx, classes, cfg)  # what drawing these masks costs, in clicks
        rev = unrecorded_revision(ctx, base, df) or ctx.store.write(
            df, parent=base, round=state.round, comment=f"import labels: {len(new)} masks from {source}")
        report["revision"] = rev
        received.update({a.sample_id: mask_digest(a.mask) for a in new})
        request["imports"].append({"source": str(source), "added": len(new), "revision": rev})
        request["revision"] = rev
        _faults.checkpoint("import:after")  # revision written, state not saved
        ctx.save_state()
        return report
