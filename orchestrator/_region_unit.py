"""Regions as the labeling unit (``loop.unit: region``): regions labeled under a budget of clicks.

A round of a region run scores every region of every image that still has something to label,
selects regions across the pool under a click budget with a region strategy
(``strategies.RegionStrategy``), has the simulated oracle label them from the ground truth (or
people, :meth:`RegionUnit.import_answers`) and writes the images' grown partial masks as a new table
revision.

Table columns besides the click columns (``orchestrator._clicks``): ``truth_path`` (the dataset's
mask: what the simulated oracle reveals; in a region run ``mask_path`` of a labeled sample is its
partial training mask), ``partial`` (the training mask holds only some regions) and
``regions_labeled`` (regions labeled so far).

The initial set is whole images, charged like image-level labels. Labeled regions
are recorded per round in ``rounds/round-NNN/labeled_regions.parquet`` (one row per region: what
the oracle did and what it cost); partial masks are written under
``<workdir>/labels/partial/round-NNN/<task name>.png``, one file per touched image and round, so a
file a revision points to is never rewritten with other content.

People label regions too (``oracle.kind: folder`` or ``label-studio``): the label phase exports the
queue (the round's budget by the model's estimate, not ``regions.queue_factor`` times it) as a region
task folder (``rounds/round-NNN/tasks``: each image with its region map and
a todo mask of the asked regions) and the round waits. :meth:`RegionUnit.import_answers` keeps an
answer's pixels inside the asked regions only, takes each asked region that holds a labeled pixel
(charged by the cost model on the answer, as the simulated oracle charges the truth) and leaves the
others in the pool; people decide how far down the queue they get, and the next round's budget evens
out what they spent. Imported partial masks are content-addressed
(``labels/partial/round-NNN/<task name>-<digest>.png``): a round may import an image more than once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import workers
from strategies import RegionStrategy, build_region_strategy
from strategies import region_columns as rcol

from . import _faults
from ._atomic import atomic_write
from ._clicks import CLICKS, LABELED_PIXELS, REGIONS_LABELED, cost_model, spent_clicks
from ._config import Config
from ._context import Context
from ._label_state import PARTIAL, mark_labeled
from ._labeling import export_folder_tasks, mask_digest, read_answers, read_manifest, task_name
from ._oracle import build_oracle
from ._round import current_revision, open_request, preannotations, round_table, unrecorded_revision, written_this_round
from ._table import IMAGE_PATH, LABELED, MASK_PATH, SAMPLE_ID, SPLIT, TRAIN_SPLIT, flag

log = logging.getLogger(__name__)

TRUTH_PATH = "truth_path"
LABELED_REGIONS_FILE = "labeled_regions.parquet"
"""Per round: one row per region the oracle labeled (``sample_id``, ``region_id``, ``round`` and
the oracle's columns: ``label_class``, ``purity``, ``mixed``, ``labeled_pixels``, ``clicks``...)."""
REGION_SCORES_DIR = "region_scores"
POOL_FILE = "region_pool.parquet"


def region_spec(cfg: Config) -> Any:
    """The ``workers.RegionSpec`` of the ``regions`` section, at ``data.image_size``."""
    names = {f.name for f in dataclasses.fields(workers.RegionSpec)} - {"image_size"}
    return workers.RegionSpec(image_size=cfg.data.image_size,
                              **{k: v for k, v in asdict(cfg.regions).items() if k in names})


def cache_uri(cfg: Config, workdir: Path) -> str:
    return cfg.regions.cache_uri or str(workdir / "region_cache")


def _sam(cfg: Config, workdir: Path) -> tuple[Any, str | None]:
    """(SamSpec, checkpoint id) for ``regions.method: sam``, else (None, None)."""
    if cfg.regions.method != "sam":
        return None, None
    sam = workers.SamSpec.from_config(asdict(cfg.sam), cfg.sam.cache_uri or str(workdir / "sam_cache"))
    return sam, sam.checkpoint_id()


def pixel_weights(rows: pd.DataFrame) -> pd.Series:
    """Training weight factors of labeled ``rows`` by sample id (``regions.train_weighting:
    labeled_pixels``): 1 for a whole image; for a partial mask the share of a whole image its labeled
    pixels make up (over the median labeled pixels of the whole images, at most 1). Drawn like whole
    images, 300 partial masks holding a few regions each would crowd out the whole images and leave
    most batches almost empty of labels; weighed so, every labeled pixel has about the same chance,
    and a round with only whole images trains exactly as an image-level round does."""
    partial = flag(rows, PARTIAL).to_numpy()
    pixels = rows[LABELED_PIXELS].astype(float).to_numpy()
    whole = pixels[~partial & np.isfinite(pixels)]
    scale = float(np.median(whole)) if len(whole) else float(np.nanmax(pixels, initial=0.0))
    factor = np.ones(len(rows))
    if scale > 0:
        factor = np.where(partial & np.isfinite(pixels), np.minimum(pixels / scale, 1.0), 1.0)
    return pd.Series(factor, index=pd.Index(rows[SAMPLE_ID].astype(str), name=SAMPLE_ID))


def round_budget(cfg: Config, round_index: int, df: pd.DataFrame, workdir: Path) -> tuple[float, float]:
    """(clicks round ``round_index`` may spend, clicks spent before it since the initial set):
    ``budget_clicks * round_index - spent``, so the difference between what earlier rounds were
    estimated to cost and what they cost is carried over. With ``regions.initial_clicks`` the
    initial set is round 0's regions (their records in ``workdir``)."""
    assert cfg.regions.budget_clicks is not None  # checked by the config
    initial = None
    if cfg.regions.initial_clicks is not None:
        records = workdir / "rounds" / "round-000" / LABELED_REGIONS_FILE
        initial = float(pd.read_parquet(records, columns=[rcol.CLICKS])[rcol.CLICKS].sum()) if records.exists() else 0.0
    spent = spent_clicks(df, initial)
    return float(cfg.regions.budget_clicks) * round_index - spent, spent


# -- labeled regions ------------------------------------------------------------------------------------


def labeled_regions(workdir: Path, before_round: int) -> pd.DataFrame:
    """``[sample_id, region_id]`` of every region labeled in rounds 0 .. before_round - 1 (round 0:
    the random regions of ``regions.initial_clicks``)."""
    frames = []
    for k in range(0, before_round):
        path = workdir / "rounds" / f"round-{k:03d}" / LABELED_REGIONS_FILE
        if path.exists():
            frames.append(pd.read_parquet(path, columns=[rcol.SAMPLE_ID, rcol.REGION_ID]))
    if not frames:
        return pd.DataFrame({rcol.SAMPLE_ID: pd.Series(dtype=str), rcol.REGION_ID: pd.Series(dtype=np.int64)})
    out = pd.concat(frames, ignore_index=True)
    return out.astype({rcol.SAMPLE_ID: str, rcol.REGION_ID: np.int64})


def region_table(workdir: Path, round_index: int, scores_dir: str | None) -> pd.DataFrame:
    """The region scores in ``scores_dir`` with a boolean ``labeled``: labeled before round ``round_index``."""
    if scores_dir is None:
        return pd.DataFrame(columns=[rcol.SAMPLE_ID, rcol.REGION_ID, rcol.LABELED])
    table = workers.read_scores(scores_dir)
    table[rcol.SAMPLE_ID] = table[rcol.SAMPLE_ID].astype(str)
    done = labeled_regions(workdir, round_index)
    keys = pd.MultiIndex.from_frame(table[[rcol.SAMPLE_ID, rcol.REGION_ID]])
    table[rcol.LABELED] = keys.isin(pd.MultiIndex.from_frame(done)) if len(done) else False
    return table


SELECTION_COLUMNS = [rcol.SAMPLE_ID, rcol.REGION_ID, "rank", "priority", rcol.COST_CLICKS, "cumulative_clicks", "reason"]


class RegionUnit:
    """An :class:`~orchestrator._context.AcquisitionUnit` labeling regions under a click budget."""

    name = "region"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.strategy: RegionStrategy = build_region_strategy(config.loop.strategy, **config.loop.strategy_options)

    # -- start ------------------------------------------------------------------------------------

    def check(self, config: Config) -> None:
        """The region strategy's declared columns against what the region scorer writes."""
        missing = sorted(self.strategy.requirements().columns - set(workers.REGION_SCORED_COLUMNS))
        if missing:
            raise ValueError(f"loop.strategy: '{config.loop.strategy}' needs {', '.join(missing)}, which the region "
                             f"scorer does not write")

    def check_pool(self, n_unlabeled: int) -> None:
        """Any pool pays for a click budget: a round spends what its regions cost, at most."""

    def prepare_table(self, table: pd.DataFrame) -> pd.DataFrame:
        """``truth_path``, ``partial`` and ``regions_labeled``: the initial set is whole images."""
        table[TRUTH_PATH] = table[MASK_PATH]
        table[PARTIAL] = False
        table[REGIONS_LABELED] = np.zeros(len(table), dtype=np.int64)
        return table

    def open_pool(self, df: pd.DataFrame) -> pd.Series:
        """Unlabeled train rows and those labeled only in part."""
        return (df[SPLIT] == TRAIN_SPLIT) & (~df[LABELED].astype(bool) | flag(df, PARTIAL))

    def weight_factors(self, rows: pd.DataFrame) -> pd.Series | None:
        if self.config.regions.train_weighting != "labeled_pixels":
            return None
        return pixel_weights(rows)

    # -- score ------------------------------------------------------------------------------------

    def score(self, ctx: Context) -> dict[str, Any]:
        """Every region of every image in the open pool, scored by the round's model in one Ray
        Data pass (``workers.score_regions``)."""
        cfg = ctx.config
        state = ctx.round_state
        t0 = time.perf_counter()
        df = ctx.read(state.revision)
        rows = df[self.open_pool(df) & ~flag(df, "excluded")]
        empty = {"scores_dir": None, "region_scores_dir": None, "num_scored": 0, "num_regions": 0,
                 "pool_uncertainty_mean": None}
        if rows.empty:
            return {**empty, "seconds": time.perf_counter() - t0}
        ctx.ray()
        round_dir = ctx.round_dir()
        batch = pd.DataFrame({
            SAMPLE_ID: rows[SAMPLE_ID].astype(str),
            IMAGE_PATH: rows[IMAGE_PATH].astype(str),
            # the partial mask of a labeled image (for labeled_frac); the pool's hidden masks are never read
            MASK_PATH: np.where(rows[LABELED].astype(bool), rows[MASK_PATH].fillna("").astype(str), ""),
        })
        pool_file = round_dir / POOL_FILE
        atomic_write(pool_file, lambda p: batch.to_parquet(p, index=False))
        classes = ctx.classes()
        shares = state.round_info["train"].get("class_pixel_frequency") or []
        weights = workers.class_pixel_weights(shares) if len(shares) == len(classes.names) and sum(shares) > 0 else None
        sam, sam_id = _sam(cfg, ctx.workdir)
        ctx.expect("score", len(batch))
        result = workers.score_regions(
            str(pool_file), state.round_info["train"]["checkpoint_path"], region_spec(cfg), cache_uri(cfg, ctx.workdir),
            str(round_dir / REGION_SCORES_DIR), class_names=tuple(classes.names), ignore_index=classes.ignore_index,
            class_weights=weights, cost=cost_model(cfg), sam=sam, sam_checkpoint_id=sam_id,
            num_actors=cfg.score.num_actors, batch_size=cfg.score.batch_size, cpus_per_actor=cfg.score.cpus_per_actor,
            gpus_per_actor=cfg.score.gpus_per_actor, progress_dir=ctx.progress_dir("score"), name=ctx.job_name("score"),
        )
        info = {**empty, "region_scores_dir": result.scores_dir, "num_scored": result.num_images,
                "num_regions": result.num_regions, "class_weights": None if weights is None else weights.tolist(),
                "seconds": time.perf_counter() - t0}
        # The pool's mean pixel entropy (the stopping criterion's input): over the unlabeled regions.
        table = region_table(ctx.workdir, state.round, result.scores_dir)
        table = table[~table[rcol.LABELED]]
        if len(table):
            pixels = table[rcol.REGION_PIXELS].to_numpy(np.float64)
            info["pool_uncertainty_mean"] = float((table[rcol.ENTROPY_MEAN].to_numpy() * pixels).sum() / pixels.sum())
        return info

    # -- select -----------------------------------------------------------------------------------

    def select(self, ctx: Context, rng: np.random.Generator) -> tuple[dict[str, Any], pd.DataFrame]:
        """The region strategy picks regions across the pool under this round's click budget
        (:func:`round_budget`); the selection table has one row per region.

        The info holds ``selected`` (the touched images' ids, in order of their first selected
        region: what the image-level phases and metrics count), ``regions`` (``[sample_id,
        region_id]`` pairs in selection order), ``budget_clicks`` (this round's),
        ``estimated_clicks`` and ``spent_before``.
        """
        cfg = ctx.config
        state = ctx.round_state
        budget, spent = round_budget(cfg, state.round, ctx.read(state.revision), ctx.workdir)
        table = region_table(ctx.workdir, state.round, state.round_info["score"].get("region_scores_dir"))
        if budget > 0 and (~table[rcol.LABELED].astype(bool)).any():
            # The simulated oracle gets a queue longer than the budget and works down it until the real
            # clicks are spent; people get the budget's worth by estimate (they do not count clicks),
            # and what their labels really cost is evened out by the next round's budget.
            factor = 1.0 if build_oracle(cfg.oracle.kind).interactive else cfg.regions.queue_factor
            chosen = self.strategy.select(table, budget * factor, rng)
        else:
            if budget <= 0:
                log.warning("round %d: no clicks left to spend (budget %.1f: earlier rounds cost more than estimated)",
                            state.round, budget)
            chosen = pd.DataFrame({c: pd.Series(dtype=object) for c in SELECTION_COLUMNS})
        scores = [c for c in table.columns if c not in {*SELECTION_COLUMNS, rcol.LABELED}]
        if len(chosen):
            chosen = chosen.sort_values("rank", kind="stable").merge(
                table[[rcol.SAMPLE_ID, rcol.REGION_ID, *scores]], on=[rcol.SAMPLE_ID, rcol.REGION_ID],
                how="left", validate="one_to_one")
        regions = [[str(s), int(r)] for s, r in zip(chosen[rcol.SAMPLE_ID], chosen[rcol.REGION_ID])]
        images = list(dict.fromkeys(s for s, _ in regions))
        estimated = float(chosen[rcol.COST_CLICKS].astype(float).sum()) if len(chosen) else 0.0
        log.info("round %d: %d regions in %d images queued, %.1f clicks (estimated) for a budget of %.1f", state.round,
                 len(regions), len(images), estimated, budget)
        info = {"selected": images, "regions": regions, "budget_clicks": budget, "estimated_clicks": estimated,
                "spent_before": spent}
        return info, chosen

    # -- label ------------------------------------------------------------------------------------

    def label(self, ctx: Context) -> dict[str, Any]:
        """The simulated oracle labels the selected regions of each touched image from its ground
        truth (``truth_path``) and region map (the cache); the labels are merged into the image's
        partial mask and the table gains one revision.

        Idempotent: a revision this round already wrote on the same parent (an interruption before the
        state was saved) is reused; masks and the labeled-regions file of an interrupted attempt are
        rewritten with the same content (the oracle is deterministic).
        """
        cfg = ctx.config
        state = ctx.round_state
        select_info = state.round_info["select"]
        parent = state.revision
        records_file = ctx.round_dir() / LABELED_REGIONS_FILE
        rev, _ = written_this_round(ctx, parent)
        if rev is not None and records_file.exists():
            records = pd.read_parquet(records_file)
        else:
            df = ctx.read(parent)
            df, records = self._label_regions(ctx, df, select_info["regions"], float(select_info["budget_clicks"]))
            atomic_write(records_file, lambda p: records.to_parquet(p, index=False))
            _faults.checkpoint("label:inside")  # masks and records written, revision not yet
            df = round_table(ctx, df)
            clicks = float(records[rcol.CLICKS].sum()) if len(records) else 0.0
            rev = ctx.store.write(
                df, parent=parent, round=state.round,
                comment=f"round {state.round}: +{len(records)} regions in {records[rcol.SAMPLE_ID].nunique()} images, "
                        f"{clicks:g} clicks by {cfg.loop.strategy}",
            )
        return _label_result(select_info, rev, parent, records, records_file)

    def initial_labels(self, ctx: Context, table: pd.DataFrame, classes: Any) -> tuple[pd.DataFrame, str] | None:
        """``regions.initial_clicks``: random regions across the pool, labeled by the simulated
        oracle until those clicks are spent (round 0); None without it (whole images, as usual).
        Every pool image's region map is made first, in a Ray Data pass; regions are drawn
        uniformly (each region as likely as any other), in a seeded order."""
        cfg = ctx.config
        clicks = cfg.regions.initial_clicks
        if clicks is None:
            return None
        ctx.ray()
        pool = table[table[SPLIT] == TRAIN_SPLIT]
        folder = ctx.workdir / "rounds" / "round-000"
        rows_file = folder / "region_images.parquet"
        atomic_write(rows_file, lambda p: pool[[SAMPLE_ID, IMAGE_PATH]].astype(str).to_parquet(p, index=False))
        sam, sam_id = _sam(cfg, ctx.workdir)
        counts = workers.count_regions(str(rows_file), str(folder / "region_counts"), region_spec(cfg),
                                       cache_uri(cfg, ctx.workdir), sam=sam, sam_checkpoint_id=sam_id,
                                       num_workers=cfg.score.num_actors, cpus=cfg.score.cpus_per_actor)
        counts = counts.sort_values(SAMPLE_ID, ignore_index=True)
        pairs = [(str(sid), r) for sid, n in zip(counts[SAMPLE_ID], counts["num_regions"]) for r in range(int(n))]
        rng = np.random.default_rng([cfg.experiment.seed, 0, 2])
        queue = [list(pairs[i]) for i in rng.permutation(len(pairs))[: int(2 * clicks) + 16]]  # every region costs >= 1
        df, records = self._label_regions(ctx, table, queue, float(clicks), round_index=0, classes=classes)
        atomic_write(folder / LABELED_REGIONS_FILE, lambda p: records.to_parquet(p, index=False))
        spent = float(records[rcol.CLICKS].sum()) if len(records) else 0.0
        return df, (f"{len(records)} random regions in {records[rcol.SAMPLE_ID].nunique()} images, {spent:g} of "
                    f"{clicks:g} clicks (regions.initial_clicks)")

    def _label_regions(self, ctx: Context, df: pd.DataFrame, regions: list[list[Any]], budget: float,
                       round_index: int | None = None, classes: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(``df`` with the touched images' new partial masks and columns, the oracle's rows).

        The oracle works down the queue ``regions`` in rank order and labels what ``budget`` clicks
        pay for at the regions' real cost (:func:`within_budget`). ``round_index`` defaults to the
        round in progress, ``classes`` to the experiment's."""
        round_index = ctx.round_state.round if round_index is None else round_index
        classes = ctx.classes() if classes is None else classes
        region_maps = _region_maps(ctx)
        cost = cost_model(ctx.config)
        queue = [(str(sid), int(rid)) for sid, rid in regions]
        position = pd.Series(np.arange(len(df)), index=df[SAMPLE_ID].astype(str))
        inputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        real: dict[tuple[str, int], float] = {}
        for sid, ids in _queue_by_image({"regions": queue}).items():  # what each queued region really costs
            row = df.iloc[int(position[sid])]
            region_map = region_maps(str(row[IMAGE_PATH]))
            truth = workers.load_mask(str(row[TRUTH_PATH]), classes)
            partial = workers.load_mask(str(row[MASK_PATH]), classes) if bool(row[LABELED]) else None
            inputs[sid] = (truth, region_map, partial)
            trial = workers.label_regions(truth, region_map, ids, ignore_index=classes.ignore_index, cost=cost)
            real.update({(sid, int(r)): float(c) for r, c in zip(trial.rows[rcol.REGION_ID], trial.rows[rcol.CLICKS])})
        kept = within_budget(queue, real, budget)
        log.info("round %d: the oracle labels %d of %d queued regions, %.1f of %.1f clicks", round_index, len(kept),
                 len(queue), sum(real[k] for k in kept), budget)
        parts = []
        for sid, ids in _queue_by_image({"regions": kept}).items():
            truth, region_map, partial = inputs[sid]
            done = workers.label_regions(truth, region_map, ids, ignore_index=classes.ignore_index, cost=cost,
                                         partial=partial)
            path = partial_mask_path(ctx.workdir, round_index, sid)
            workers.write_mask(path, done.mask)
            _grow_partial(df, df.index[int(position[sid])], round_index, path, done, classes.ignore_index, ctx.config)
            parts.append(done.rows.assign(**{rcol.SAMPLE_ID: sid, "round": round_index}))
        if parts:
            records = pd.concat(parts, ignore_index=True)
            records = _in_rank_order(records, kept)
        else:
            records = _no_records()
        return df, records

    # -- people -----------------------------------------------------------------------------------

    def request_labels(self, ctx: Context) -> dict[str, Any] | None:
        """The first call exports the queue as a region task folder (``rounds/round-NNN/tasks``) and
        records the label request: None, the round waits. Once :meth:`import_answers` took answers
        in, the phase result of what came back (same keys as the simulated oracle's, plus
        ``requested`` images and ``partial``: some queued regions unanswered)."""
        state = ctx.round_state
        select_info = state.round_info["select"]
        records_file = ctx.round_dir() / LABELED_REGIONS_FILE
        if not select_info["regions"]:  # nothing queued (no clicks left): nothing to ask, nothing to wait for
            records = _no_records()
            atomic_write(records_file, lambda p: records.to_parquet(p, index=False))
            return _label_result(select_info, state.revision, state.revision, records, records_file)
        request = state.round_info.get("label_request")
        if request is None:
            selected = [str(s) for s in select_info["selected"]]
            asked = _queue_by_image(select_info)
            df = ctx.read(state.revision)
            images = df.set_index(SAMPLE_ID).loc[selected, IMAGE_PATH].astype(str)
            region_map = _region_maps(ctx)
            task_dir = ctx.round_dir() / "tasks"
            export_folder_tasks(
                df, selected, task_dir, ctx.classes(), round_index=state.round, kind="region",
                preannotations=preannotations(ctx, selected), label_studio=ctx.label_studio(), workdir=ctx.workdir,
                regions={sid: (region_map(images[sid]), asked[sid]) for sid in selected},
            )
            _faults.checkpoint("label:inside")  # task folder exported, request not yet recorded
            open_request(state, task_dir, selected)
            log.info("round %d: %d regions in %d images exported for labeling to %s", state.round,
                     len(select_info["regions"]), len(selected), task_dir)
            return None
        if not request["received"]:
            return None
        records = _imported_records(records_file, request["received"])
        if len(records) != len(pd.read_parquet(records_file, columns=[rcol.REGION_ID])):
            # rows of an import killed before it was recorded: the next rounds must not see them as labeled
            atomic_write(records_file, lambda p: records.to_parquet(p, index=False))
        return {**_label_result(select_info, request["revision"], state.revision, records, records_file),
                "requested": len(request["requested"]), "partial": len(records) < len(select_info["regions"])}

    def import_answers(self, ctx: Context, request: dict[str, Any], source: Path) -> dict[str, Any]:
        """Add people's answers to the round's region task (``request``, the open label request) as one
        table revision; ``source`` is a folder of class-id PNGs or a Label Studio JSON export.

        Every answer is validated first (``read_answers``): a bad file raises ``ValueError`` naming it
        and nothing is added. Per answered image, the answer's pixels inside its queued regions are kept
        (the ignore index elsewhere); a queued region holding at least one labeled pixel is labeled,
        charged by the cost model on the answer (``workers.label_regions``: one click, plus the polygons
        of a mixed region's other classes), and the answered pixels merge into the image's partial mask
        without overwriting a labeled one; a region left empty stays in the pool. A region imported
        earlier this round keeps its first answer, so importing the same answers twice changes nothing
        and a later import adds the regions and images that were missing. ``labeled_regions.parquet``
        gains one row per region, never two.
        """
        cfg = ctx.config
        state = ctx.round_state
        classes = ctx.classes()
        ignore = classes.ignore_index
        task = Path(request["task_dir"])
        manifest = read_manifest(task)
        if manifest.get("kind") != "region":
            raise ValueError(f"{task / 'manifest.json'}: kind {manifest.get('kind')!r} is not a region task; "
                             f"export it again with shoal resume {ctx.workdir}")
        answers = read_answers(source, manifest, classes, cfg.oracle.label_map)
        base = current_revision(state)
        df = round_table(ctx) if not request["revision"] else ctx.read(base)
        received: dict[str, list[int]] = request["received"]
        asked = _queue_by_image(state.round_info["select"])
        region_map = _region_maps(ctx)
        cost = cost_model(cfg)
        position = pd.Series(np.arange(len(df)), index=df[SAMPLE_ID].astype(str))
        parts, added = [], {}
        for answer in answers:
            sid = answer.sample_id
            taken = set(received.get(sid, []))
            open_ids = [r for r in asked.get(sid, []) if r not in taken]
            row = df.iloc[int(position[sid])]
            regions = workers.resize_regions(region_map(str(row[IMAGE_PATH])), answer.mask.shape)
            answered = np.where(np.isin(regions, open_ids), answer.mask.astype(np.int64), ignore)
            with_labels = set(np.unique(regions[answered != ignore]).tolist())
            ids = [r for r in open_ids if r in with_labels]
            if not ids:  # nothing new inside the asked regions
                continue
            partial = workers.load_mask(str(row[MASK_PATH]), classes) if bool(row[LABELED]) else None
            # The cost model's rows for the answer (clicks, mixed, label_class); the mask keeps the answered
            # pixels themselves rather than the dominant class the simulated oracle would spread.
            done = workers.label_regions(answered, regions, ids, ignore_index=ignore, cost=cost, partial=partial)
            mask = workers.merge_partial_masks(np.full(answered.shape, ignore) if partial is None else partial, answered, ignore)
            path = imported_mask_path(ctx.workdir, state.round, sid, mask)
            if not path.exists():  # content-addressed: never overwritten
                workers.write_mask(path, mask)
            _grow_partial(df, df.index[int(position[sid])], state.round, path, done, ignore, cfg, mask=mask)
            parts.append(done.rows.assign(**{rcol.SAMPLE_ID: sid, "round": state.round}))
            added[sid] = ids
        report: dict[str, Any] = {"source": str(source), "found": len(answers), "added": list(added),
                                  "unchanged": len(answers) - len(added), "revision": base, "regions": 0, "clicks": 0.0}
        if not parts:
            return report
        new = pd.concat(parts, ignore_index=True)
        new = _in_rank_order(new, state.round_info["select"]["regions"])
        records_file = ctx.round_dir() / LABELED_REGIONS_FILE
        before = _imported_records(records_file, received)
        records = pd.concat([before, new], ignore_index=True) if len(before) else new
        atomic_write(records_file, lambda p: records.to_parquet(p, index=False))
        _faults.checkpoint("import:inside")  # masks and labeled regions written, no revision yet
        clicks = float(new[rcol.CLICKS].sum())
        rev = unrecorded_revision(ctx, base, df) or ctx.store.write(
            df, parent=base, round=state.round,
            comment=f"import region labels: +{len(new)} regions in {len(added)} images, {clicks:g} clicks from {source}")
        for sid, ids in added.items():
            received[sid] = sorted({*received.get(sid, []), *ids})
        request["imports"].append({"source": str(source), "added": len(added), "regions": len(new), "clicks": clicks,
                                   "revision": rev})
        request["revision"] = rev
        _faults.checkpoint("import:after")  # revision written, state not saved
        ctx.save_state()
        log.info("round %d: imported %d regions in %d images, %.1f clicks, from %s", state.round, len(new), len(added),
                 clicks, source)
        return {**report, "revision": rev, "regions": len(new), "clicks": clicks}


# -- helpers --------------------------------------------------------------------------------------------


def within_budget(queue: list[tuple[str, int]], clicks: dict[tuple[str, int], float], budget: float) -> list[tuple[str, int]]:
    """The regions of ``queue`` (in rank order) an annotator labels with ``budget`` clicks: each in
    turn, skipping one whose real cost (``clicks``) would take the total over the budget."""
    kept, total = [], 0.0
    for key in queue:
        if total + clicks[key] <= budget + 1e-9:
            kept.append(key)
            total += clicks[key]
    return kept


def _grow_partial(df: pd.DataFrame, i: Any, round_index: int, path: Path, done: Any, ignore_index: int,
                  config: Config, mask: np.ndarray | None = None) -> None:
    """Row ``i`` of ``df`` after labeling regions of its image (``done``, a ``workers.RegionLabeling``;
    its mask, or ``mask`` when the written labels differ from the oracle's) into the partial mask at
    ``path``: labeled and partial from this round on, mask path, labeled pixels, clicks, regions."""
    row = pd.Series(df.index == i, index=df.index)
    mark_labeled(df, row, round_index=round_index, config=config, mask_paths={str(df.loc[i, SAMPLE_ID]): str(path)},
                 partial=True)
    df.loc[i, LABELED_PIXELS] = workers.labeled_pixel_count(done.mask if mask is None else mask, ignore_index)
    df.loc[i, CLICKS] = float(df.loc[i, CLICKS]) + done.cost.clicks
    df.loc[i, REGIONS_LABELED] = int(df.loc[i, REGIONS_LABELED]) + len(done.rows)


def _in_rank_order(records: pd.DataFrame, queue: list[Any]) -> pd.DataFrame:
    """``records`` (one row per labeled region) in the order of ``queue`` ([sample_id, region_id]
    pairs in rank order), ``sample_id`` first."""
    rank = {(str(sid), int(rid)): k for k, (sid, rid) in enumerate(queue)}
    order = np.argsort([rank[(str(s), int(r))] for s, r in zip(records[rcol.SAMPLE_ID], records[rcol.REGION_ID])],
                       kind="stable")
    records = records.iloc[order].reset_index(drop=True)
    return records[[rcol.SAMPLE_ID, *[c for c in records.columns if c != rcol.SAMPLE_ID]]]


def _region_maps(ctx: Context) -> Callable[[str], np.ndarray]:
    """image path -> its int32 region map at the scoring resolution: the cached map the round scored,
    recomputed the same way when the cache was cleared since."""
    cfg = ctx.config
    spec = region_spec(cfg)
    uri = cache_uri(cfg, ctx.workdir)
    sam, sam_id = _sam(cfg, ctx.workdir)
    cache = workers.RegionCache(uri, spec, sam_id)
    proposer = None

    def region_map(image_path: str) -> np.ndarray:
        nonlocal proposer
        found = cache.get(workers.file_digest(image_path))
        if found is not None:
            return found
        proposer = proposer or workers.RegionProposer(spec, uri, sam, sam_id)
        regions, _ = proposer.regions(image_path)
        return regions

    return region_map


def partial_mask_path(workdir: Path, round_index: int, sample_id: str) -> Path:
    return workdir / "labels" / "partial" / f"round-{round_index:03d}" / f"{task_name(sample_id)}.png"


def _label_result(select_info: dict[str, Any], rev: str, parent: str, records: pd.DataFrame,
                  records_file: Path) -> dict[str, Any]:
    """The label phase's result from the round's labeled-regions rows (the same keys whoever labeled)."""
    labeled = set(records[rcol.SAMPLE_ID].astype(str)) if len(records) else set()
    return {"revision": rev, "parent": parent, "added": [s for s in select_info["selected"] if s in labeled],
            "regions": int(len(records)), "queued_regions": len(select_info["regions"]),
            "budget_clicks": float(select_info["budget_clicks"]), "clicks": float(records[rcol.CLICKS].sum()) if len(records) else 0.0,
            "estimated_clicks": float(select_info.get("estimated_clicks", 0.0)),
            "labeled_pixels_added": int(records[rcol.LABELED_PIXELS].sum()) if len(records) else 0,
            "mixed_regions": int(records[rcol.MIXED].sum()) if len(records) else 0,
            "regions_file": str(records_file)}


def _queue_by_image(select_info: dict[str, Any]) -> dict[str, list[int]]:
    """sample id -> its queued region ids, in rank order."""
    asked: dict[str, list[int]] = {}
    for sid, rid in select_info["regions"]:
        asked.setdefault(str(sid), []).append(int(rid))
    return asked


def _no_records() -> pd.DataFrame:
    return pd.DataFrame({rcol.SAMPLE_ID: pd.Series(dtype=str), rcol.REGION_ID: pd.Series(dtype=np.int64),
                         rcol.CLICKS: pd.Series(dtype=float), rcol.LABELED_PIXELS: pd.Series(dtype=np.int64),
                         rcol.MIXED: pd.Series(dtype=bool), "round": pd.Series(dtype=np.int64)})


def _imported_records(records_file: Path, received: dict[str, list[int]]) -> pd.DataFrame:
    """The rows of the round's labeled-regions file that the label request records as imported: an
    import killed before the state was saved may have left rows that no revision holds."""
    if not records_file.exists():
        return _no_records()
    rows = pd.read_parquet(records_file)
    keys = {(str(sid), int(rid)) for sid, rids in received.items() for rid in rids}
    keep = [(str(s), int(r)) in keys for s, r in zip(rows[rcol.SAMPLE_ID], rows[rcol.REGION_ID])]
    return rows[np.asarray(keep, dtype=bool)].reset_index(drop=True)


def imported_mask_path(workdir: Path, round_index: int, sample_id: str, mask: np.ndarray) -> Path:
    """Where an imported partial mask is written: named by its content, so importing into an image
    twice in a round never rewrites a file an earlier revision points to."""
    return workdir / "labels" / "partial" / f"round-{round_index:03d}" / f"{task_name(sample_id)}-{mask_digest(mask)}.png"
