"""Region-level acquisition in the loop (``loop.unit: region``): the phases' region branches.

A round of a region run scores every region of every image that still has something to label,
selects regions across the pool under a click budget with a region strategy, has the simulated
oracle label them from the ground truth and writes the images' grown partial masks as a new table
revision. The loop's phases call :func:`score`, :func:`select` and :func:`label` when the unit is
``region``; the helpers that fill the click columns (:func:`prepare_table`, :func:`charge_images`)
and the click metrics (:func:`click_metrics`) serve image-level runs too, so both units are
compared on the same axis.

Table columns (optional: absent from tables of experiments started before them):

- ``clicks``: clicks spent on the sample so far (float; image-level: the polygons of its whole
  mask, ``strategies.mask_annotation_cost``; region-level: the sum of its labeled regions' costs);
- ``labeled_pixels``: pixels of its training mask that hold a class (int);
- region runs only: ``truth_path`` (the dataset's mask: what the simulated oracle reveals; in a
  region run ``mask_path`` of a labeled sample is its partial training mask), ``partial`` (the
  training mask holds only some regions) and ``regions_labeled`` (regions labeled so far).

The initial set is whole images in both units, charged like image-level labels. Labeled regions
are recorded per round in ``rounds/round-NNN/labeled_regions.parquet`` (one row per region: what
the oracle did and what it cost); partial masks are written under
``<workdir>/labels/partial/round-NNN/<task name>.png``, one file per touched image and round, so a
file a revision points to is never rewritten with other content.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import workers
from strategies import CostModel, build_region_strategy
from strategies import region_columns as rcol

from . import _faults
from ._atomic import atomic_write
from ._config import Config
from ._labeling import task_name
from ._table import IMAGE_PATH, LABELED, MASK_PATH, ROUND_LABELED, SAMPLE_ID, SPLIT, TRAIN_SPLIT, WEIGHT

if TYPE_CHECKING:
    from strategies import RegionStrategy

    from ._loop import ActiveLearningLoop
    from ._state import State

log = logging.getLogger(__name__)

TRUTH_PATH = "truth_path"
PARTIAL = "partial"
LABELED_PIXELS = "labeled_pixels"
CLICKS = "clicks"
REGIONS_LABELED = "regions_labeled"
LABELED_REGIONS_FILE = "labeled_regions.parquet"
"""Per round: one row per region the oracle labeled (``sample_id``, ``region_id``, ``round`` and
the oracle's columns: ``label_class``, ``purity``, ``mixed``, ``labeled_pixels``, ``clicks``...)."""
REGION_SCORES_DIR = "region_scores"
POOL_FILE = "region_pool.parquet"


def is_region_run(cfg: Config) -> bool:
    return cfg.loop.unit == "region"


def cost_model(cfg: Config) -> CostModel:
    return CostModel(**asdict(cfg.cost))


def region_spec(cfg: Config) -> Any:
    """The ``workers.RegionSpec`` of the ``regions`` section, at ``data.image_size``."""
    import dataclasses

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


def region_strategy(cfg: Config) -> RegionStrategy:
    """The configured region strategy, checked against the columns the region scorer writes."""
    strategy = build_region_strategy(cfg.loop.strategy, **cfg.loop.strategy_options)
    missing = sorted(strategy.requirements().columns - set(workers.REGION_SCORED_COLUMNS))
    if missing:
        raise ValueError(f"loop.strategy: '{cfg.loop.strategy}' needs {', '.join(missing)}, which the region "
                         f"scorer does not write")
    return strategy


# -- table columns ---------------------------------------------------------------------------------------


def _with_cost_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``clicks`` and ``labeled_pixels``: 0 for unlabeled rows; NaN for rows labeled
    before the columns existed (an experiment started by an older Shoal: their cost is unknown)."""
    if CLICKS not in df.columns:
        df[CLICKS] = np.where(df[LABELED], np.nan, 0.0)
    if LABELED_PIXELS not in df.columns:
        pixels = np.where(df[LABELED], np.nan, 0.0)
        df[LABELED_PIXELS] = pixels if np.isnan(pixels).any() else pixels.astype(np.int64)
    return df


def charge_images(df: pd.DataFrame, rows: pd.Series, classes: Any, cfg: Config) -> pd.DataFrame:
    """``df`` with ``clicks`` and ``labeled_pixels`` of the ``rows`` (a boolean mask) set to what
    drawing their whole mask (``mask_path``) costs (``workers.image_annotation_costs``)."""
    df = _with_cost_columns(df)
    if not rows.any():
        return df
    costs = workers.image_annotation_costs(
        df.loc[rows, SAMPLE_ID].astype(str).tolist(), df.loc[rows, MASK_PATH].astype(str).tolist(), classes,
        cost_model(cfg)).set_index(SAMPLE_ID)
    ids = df.loc[rows, SAMPLE_ID].astype(str)
    df.loc[rows, CLICKS] = ids.map(costs["clicks"]).astype(float).to_numpy()
    df.loc[rows, LABELED_PIXELS] = ids.map(costs["pixels"]).to_numpy()
    return df


def prepare_table(table: pd.DataFrame, initial: pd.Series, classes: Any, cfg: Config) -> pd.DataFrame:
    """The first revision's extra columns: the initial set (``initial``, a boolean mask) charged as
    whole images in both units; in region runs ``truth_path``, ``partial`` and ``regions_labeled``."""
    table[CLICKS] = 0.0
    table[LABELED_PIXELS] = np.zeros(len(table), dtype=np.int64)
    table = charge_images(table, initial, classes, cfg)
    if is_region_run(cfg):
        table[TRUTH_PATH] = table[MASK_PATH]
        table[PARTIAL] = False
        table[REGIONS_LABELED] = np.zeros(len(table), dtype=np.int64)
    return table


def open_pool(df: pd.DataFrame) -> pd.Series:
    """Train rows with something left to label: unlabeled, or labeled only in part (region runs)."""
    return (df[SPLIT] == TRAIN_SPLIT) & (~df[LABELED].astype(bool) | _flag(df, PARTIAL))


def _flag(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(False, index=df.index)
    return df[column].fillna(False).astype(bool)


def spent_clicks(df: pd.DataFrame) -> float:
    """Clicks spent on labels since the initial set (rows first labeled in round 1 or later)."""
    if CLICKS not in df.columns:
        return 0.0
    rows = df[LABELED].astype(bool) & (df[ROUND_LABELED] > 0)
    return float(df.loc[rows, CLICKS].sum())


def round_budget(cfg: Config, round_index: int, df: pd.DataFrame) -> tuple[float, float]:
    """(clicks round ``round_index`` may spend, clicks spent before it since the initial set):
    ``budget_clicks * round_index - spent``, so the difference between what earlier rounds were
    estimated to cost and what they cost is carried over."""
    assert cfg.regions.budget_clicks is not None  # checked by the config
    spent = spent_clicks(df)
    return float(cfg.regions.budget_clicks) * round_index - spent, spent


# -- labeled regions ------------------------------------------------------------------------------------


def labeled_regions(workdir: Path, before_round: int) -> pd.DataFrame:
    """``[sample_id, region_id]`` of every region labeled in rounds 1 .. before_round - 1."""
    frames = []
    for k in range(1, before_round):
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


# -- phases ---------------------------------------------------------------------------------------------


def score(loop: ActiveLearningLoop, state: State) -> dict[str, Any]:
    """The score phase of a region run: every region of every image in the open pool, scored by
    the round's model in one Ray Data pass (``workers.score_regions``)."""
    cfg = loop.config
    region_strategy(cfg)  # fail before any work when the strategy needs what is not written
    t0 = time.perf_counter()
    df = loop.store.read(state.revision)
    rows = df[open_pool(df) & ~_flag(df, "excluded")]
    empty = {"scores_dir": None, "region_scores_dir": None, "num_scored": 0, "num_regions": 0,
             "pool_uncertainty_mean": None}
    if rows.empty:
        return {**empty, "seconds": time.perf_counter() - t0}
    loop._ray()
    round_dir = loop._round_dir(state)
    batch = pd.DataFrame({
        SAMPLE_ID: rows[SAMPLE_ID].astype(str),
        IMAGE_PATH: rows[IMAGE_PATH].astype(str),
        # the partial mask of a labeled image (for labeled_frac); the pool's hidden masks are never read
        MASK_PATH: np.where(rows[LABELED].astype(bool), rows[MASK_PATH].fillna("").astype(str), ""),
    })
    pool_file = round_dir / POOL_FILE
    atomic_write(pool_file, lambda p: batch.to_parquet(p, index=False))
    classes = loop._classes()
    shares = state.round_info["train"].get("class_pixel_frequency") or []
    weights = workers.class_pixel_weights(shares) if len(shares) == len(classes.names) and sum(shares) > 0 else None
    sam, sam_id = _sam(cfg, loop.workdir)
    result = workers.score_regions(
        str(pool_file), state.round_info["train"]["checkpoint_path"], region_spec(cfg), cache_uri(cfg, loop.workdir),
        str(round_dir / REGION_SCORES_DIR), class_names=tuple(classes.names), ignore_index=classes.ignore_index,
        class_weights=weights, cost=cost_model(cfg), sam=sam, sam_checkpoint_id=sam_id,
        num_actors=cfg.score.num_actors, batch_size=cfg.score.batch_size, cpus_per_actor=cfg.score.cpus_per_actor,
        gpus_per_actor=cfg.score.gpus_per_actor,
    )
    info = {**empty, "region_scores_dir": result.scores_dir, "num_scored": result.num_images,
            "num_regions": result.num_regions, "class_weights": None if weights is None else weights.tolist(),
            "seconds": time.perf_counter() - t0}
    # The pool's mean pixel entropy (the stopping criterion's input): over the unlabeled regions.
    table = region_table(loop.workdir, state.round, result.scores_dir)
    table = table[~table[rcol.LABELED]]
    if len(table):
        pixels = table[rcol.REGION_PIXELS].to_numpy(np.float64)
        info["pool_uncertainty_mean"] = float((table[rcol.ENTROPY_MEAN].to_numpy() * pixels).sum() / pixels.sum())
    return info


SELECTION_COLUMNS = [rcol.SAMPLE_ID, rcol.REGION_ID, "rank", "priority", rcol.COST_CLICKS, "cumulative_clicks", "reason"]


def select(loop: ActiveLearningLoop, state: State) -> dict[str, Any]:
    """The select phase of a region run: the region strategy picks regions across the pool under
    this round's click budget (:func:`round_budget`); ``selection.csv`` has one row per region.

    Returns ``selected`` (the touched images' ids, in order of their first selected region: what
    the image-level phases and metrics count), ``regions`` (``[sample_id, region_id]`` pairs in
    selection order), ``budget_clicks`` (this round's), ``estimated_clicks`` and ``spent_before``.
    """
    cfg = loop.config
    t0 = time.perf_counter()
    budget, spent = round_budget(cfg, state.round, loop.store.read(state.revision))
    table = region_table(loop.workdir, state.round, state.round_info["score"].get("region_scores_dir"))
    strategy = region_strategy(cfg)
    rng = np.random.default_rng([cfg.experiment.seed, state.round, 1])
    if budget > 0 and (~table[rcol.LABELED].astype(bool)).any():
        chosen = strategy.select(table, budget, rng)
    else:
        if budget <= 0:
            log.warning("round %d: no clicks left to spend (budget %.1f: earlier rounds cost more than estimated)",
                        state.round, budget)
        chosen = pd.DataFrame({c: pd.Series(dtype=object) for c in SELECTION_COLUMNS})
    seconds = time.perf_counter() - t0
    scores = [c for c in table.columns if c not in {*SELECTION_COLUMNS, rcol.LABELED}]
    if len(chosen):
        chosen = chosen.merge(table[[rcol.SAMPLE_ID, rcol.REGION_ID, *scores]], on=[rcol.SAMPLE_ID, rcol.REGION_ID],
                              how="left", validate="one_to_one")
    path = loop._round_dir(state) / "selection.csv"
    atomic_write(path, lambda p: chosen.to_csv(p, index=False))
    regions = [[str(s), int(r)] for s, r in zip(chosen[rcol.SAMPLE_ID], chosen[rcol.REGION_ID])]
    images = list(dict.fromkeys(s for s, _ in regions))
    estimated = float(chosen[rcol.COST_CLICKS].astype(float).sum()) if len(chosen) else 0.0
    log.info("round %d: %d regions in %d images selected, %.1f of %.1f clicks (estimated)", state.round,
             len(regions), len(images), estimated, budget)
    return {"selected": images, "regions": regions, "budget_clicks": budget, "estimated_clicks": estimated,
            "spent_before": spent, "selection_file": str(path), "seconds": seconds}


def partial_mask_path(workdir: Path, round_index: int, sample_id: str) -> Path:
    return workdir / "labels" / "partial" / f"round-{round_index:03d}" / f"{task_name(sample_id)}.png"


def label(loop: ActiveLearningLoop, state: State) -> dict[str, Any]:
    """The label phase of a region run: the simulated oracle labels the selected regions of each
    touched image from its ground truth (``truth_path``) and region map (the cache), the labels
    are merged into the image's partial mask and the table gains one revision.

    Idempotent: a revision this round already wrote on the same parent (an interruption before the
    state was saved) is reused; masks and the labeled-regions file of an interrupted attempt are
    rewritten with the same content (the oracle is deterministic).
    """
    cfg = loop.config
    select_info = state.round_info["select"]
    parent = state.revision
    round_dir = loop._round_dir(state)
    records_file = round_dir / LABELED_REGIONS_FILE
    latest = loop.store.info(loop.store.revisions()[-1])
    if latest.parent == parent and latest.round == state.round and records_file.exists():
        rev = latest.id
        records = pd.read_parquet(records_file)
    else:
        df = loop.store.read(parent)
        df, records = _label_regions(loop, state, df, select_info["regions"])
        atomic_write(records_file, lambda p: records.to_parquet(p, index=False))
        _faults.checkpoint("label:inside")  # masks and records written, revision not yet
        df = loop._with_train_signals(loop._with_scores(df, state), state)
        clicks = float(records[rcol.CLICKS].sum()) if len(records) else 0.0
        rev = loop.store.write(
            df, parent=parent, round=state.round,
            comment=f"round {state.round}: +{len(records)} regions in {records[rcol.SAMPLE_ID].nunique()} images, "
                    f"{clicks:g} clicks by {cfg.loop.strategy}",
        )
    return {"revision": rev, "parent": parent, "added": list(select_info["selected"]),
            "regions": int(len(records)), "clicks": float(records[rcol.CLICKS].sum()) if len(records) else 0.0,
            "estimated_clicks": float(select_info.get("estimated_clicks", 0.0)),
            "labeled_pixels_added": int(records[rcol.LABELED_PIXELS].sum()) if len(records) else 0,
            "mixed_regions": int(records[rcol.MIXED].sum()) if len(records) else 0,
            "regions_file": str(records_file)}


def _label_regions(loop: ActiveLearningLoop, state: State, df: pd.DataFrame,
                   regions: list[list[Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``df`` with the touched images' new partial masks and columns, the oracle's rows)."""
    cfg = loop.config
    classes = loop._classes()
    spec = region_spec(cfg)
    uri = cache_uri(cfg, loop.workdir)
    sam, sam_id = _sam(cfg, loop.workdir)
    cache = workers.RegionCache(uri, spec, sam_id)
    proposer = None
    cost = cost_model(cfg)
    wanted: dict[str, list[int]] = {}
    for sid, rid in regions:
        wanted.setdefault(str(sid), []).append(int(rid))
    position = pd.Series(np.arange(len(df)), index=df[SAMPLE_ID].astype(str))
    parts = []
    for sid, ids in wanted.items():
        row = df.iloc[int(position[sid])]
        image_path = str(row[IMAGE_PATH])
        region_map = cache.get(workers.file_digest(image_path))
        if region_map is None:  # the cache was cleared since scoring: the same map again
            proposer = proposer or workers.RegionProposer(spec, uri, sam, sam_id)
            region_map, _ = proposer.regions(image_path)
        truth = workers.load_mask(str(row[TRUTH_PATH]), classes)
        partial = workers.load_mask(str(row[MASK_PATH]), classes) if bool(row[LABELED]) else None
        done = workers.label_regions(truth, region_map, ids, ignore_index=classes.ignore_index, cost=cost,
                                     partial=partial)
        path = partial_mask_path(loop.workdir, state.round, sid)
        workers.write_mask(path, done.mask)
        i = df.index[int(position[sid])]
        if not bool(row[LABELED]):
            df.loc[i, [LABELED, PARTIAL]] = [True, True]
            df.loc[i, ROUND_LABELED] = state.round
            df.loc[i, WEIGHT] = 1.0
        df.loc[i, MASK_PATH] = str(path)
        df.loc[i, LABELED_PIXELS] = workers.labeled_pixel_count(done.mask, classes.ignore_index)
        df.loc[i, CLICKS] = float(row[CLICKS]) + done.cost.clicks
        df.loc[i, REGIONS_LABELED] = int(row[REGIONS_LABELED]) + len(ids)
        parts.append(done.rows.assign(**{rcol.SAMPLE_ID: sid, "round": state.round}))
    if parts:
        records = pd.concat(parts, ignore_index=True)
        records = records[[rcol.SAMPLE_ID, *[c for c in records.columns if c != rcol.SAMPLE_ID]]]
    else:
        records = pd.DataFrame({rcol.SAMPLE_ID: pd.Series(dtype=str), rcol.REGION_ID: pd.Series(dtype=np.int64),
                                rcol.CLICKS: pd.Series(dtype=float), rcol.LABELED_PIXELS: pd.Series(dtype=np.int64),
                                rcol.MIXED: pd.Series(dtype=bool), "round": pd.Series(dtype=np.int64)})
    return df, records


# -- tracking -------------------------------------------------------------------------------------------


def click_metrics(store: Any, label_info: dict[str, Any]) -> dict[str, float]:
    """The round's cost metrics from its label revision and parent: ``labeled_clicks`` (the labeled
    set's clicks after the round, the initial set included), ``trained_on_clicks`` (the clicks of
    the revision the round's model trained on: the click axis of the learning curve),
    ``round_clicks``, ``labeled_pixels_total`` and, in region runs, ``labeled_regions``. Empty for
    tables without the cost columns."""
    after = store.read(label_info["revision"])
    if CLICKS not in after.columns:
        return {}
    before = store.read(label_info["parent"])

    def clicks(df: pd.DataFrame) -> float:
        if CLICKS not in df.columns:
            return float("nan")
        return float(df.loc[df[LABELED].astype(bool), CLICKS].sum())

    labeled = after[LABELED].astype(bool)
    out = {"labeled_clicks": clicks(after), "trained_on_clicks": clicks(before),
           "labeled_pixels_total": float(after.loc[labeled, LABELED_PIXELS].sum())}
    out["round_clicks"] = out["labeled_clicks"] - out["trained_on_clicks"]
    if REGIONS_LABELED in after.columns:
        out["labeled_regions"] = float(after[REGIONS_LABELED].sum())
    return out


def round_extra(metrics: dict[str, float]) -> dict[str, float]:
    """What a ``RoundResult``'s ``extra`` carries for the click axis: ``clicks`` (the labeled set's
    clicks after the round) and ``trained_on_clicks`` (those its model was trained on)."""
    out = {}
    if "labeled_clicks" in metrics:
        out["clicks"] = metrics["labeled_clicks"]
    if "trained_on_clicks" in metrics:
        out["trained_on_clicks"] = metrics["trained_on_clicks"]
    return out
