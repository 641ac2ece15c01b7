"""What labels cost, in annotator clicks, for both acquisition units: one axis to compare them on.

Table columns (optional: absent from tables of experiments started before them):

- ``clicks``: clicks spent on the sample so far (float; a whole image: the polygons of its mask,
  ``strategies.mask_annotation_cost``; a region-labeled image: the sum of its regions' costs);
- ``labeled_pixels``: pixels of its training mask that hold a class (int).

The initial set is charged as whole images in both units. Each round records ``labeled_clicks``,
``trained_on_clicks``, ``round_clicks`` and ``labeled_pixels_total`` (:func:`click_metrics`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

import workers
from strategies import CostModel

from ._config import Config
from ._table import LABELED, MASK_PATH, ROUND_LABELED, SAMPLE_ID

LABELED_PIXELS = "labeled_pixels"
CLICKS = "clicks"
REGIONS_LABELED = "regions_labeled"
"""Regions labeled so far (region runs only): counted by :func:`click_metrics` when present."""


def cost_model(cfg: Config) -> CostModel:
    return CostModel(**asdict(cfg.cost))


def with_cost_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``clicks`` and ``labeled_pixels``: 0 for unlabeled rows; NaN for rows labeled
    before the columns existed (an experiment started by an older Shoal: their cost is unknown)."""
    if CLICKS not in df.columns:
        df[CLICKS] = np.where(df[LABELED], np.nan, 0.0)
    if LABELED_PIXELS not in df.columns:
        pixels = np.where(df[LABELED], np.nan, 0.0)
        df[LABELED_PIXELS] = pixels if np.isnan(pixels).any() else pixels.astype(np.int64)
    return df


def new_cost_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The first revision's cost columns, all zero."""
    table[CLICKS] = 0.0
    table[LABELED_PIXELS] = np.zeros(len(table), dtype=np.int64)
    return table


def charge_images(df: pd.DataFrame, rows: pd.Series, classes: Any, cfg: Config) -> pd.DataFrame:
    """``df`` with ``clicks`` and ``labeled_pixels`` of the ``rows`` (a boolean mask) set to what
    drawing their whole mask (``mask_path``) costs (``workers.image_annotation_costs``)."""
    df = with_cost_columns(df)
    if not rows.any():
        return df
    costs = workers.image_annotation_costs(
        df.loc[rows, SAMPLE_ID].astype(str).tolist(), df.loc[rows, MASK_PATH].astype(str).tolist(), classes,
        cost_model(cfg)).set_index(SAMPLE_ID)
    ids = df.loc[rows, SAMPLE_ID].astype(str)
    df.loc[rows, CLICKS] = ids.map(costs["clicks"]).astype(float).to_numpy()
    df.loc[rows, LABELED_PIXELS] = ids.map(costs["pixels"]).to_numpy()
    return df


def spent_clicks(df: pd.DataFrame, initial_regions_clicks: float | None = None) -> float:
    """Clicks spent on labels since the initial set. The initial set is the rows first labeled in
    round 0 (whole images, never labeled again); with ``regions.initial_clicks`` it is the round-0
    regions, worth ``initial_regions_clicks``: their images take more regions in later rounds, whose
    clicks add to the same rows, so everything labeled beyond those clicks counts as spent."""
    if CLICKS not in df.columns:
        return 0.0
    labeled = df[LABELED].astype(bool)
    if initial_regions_clicks is not None:
        return float(df.loc[labeled, CLICKS].sum()) - float(initial_regions_clicks)
    rows = labeled & (df[ROUND_LABELED] > 0)
    return float(df.loc[rows, CLICKS].sum())


def click_metrics(after: pd.DataFrame, before: pd.DataFrame) -> dict[str, float]:
    """The round's cost metrics from its label revision (``after``) and its parent (``before``):
    ``labeled_clicks`` (the labeled set's clicks after the round, the initial set included),
    ``trained_on_clicks`` (the clicks of the revision the round's model trained on: the click axis
    of the learning curve), ``round_clicks``, ``labeled_pixels_total`` and, in region runs,
    ``labeled_regions``. Empty for tables without the cost columns."""
    if CLICKS not in after.columns:
        return {}

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
