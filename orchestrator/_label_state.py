"""The one place where a sample's label state changes: labeled, the round it was labeled in, its
training weight on labeling, the mask it trains on, a partial (region) mask, a mask sent back for
relabeling. The start, the simulated oracle, imports from people and region labels all go through
these two functions, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from ._table import LABELED, MASK_PATH, ROUND_LABELED, SAMPLE_ID, WEIGHT

PARTIAL = "partial"
"""Region runs: the training mask holds only some regions (the image stays in the pool)."""
NEEDS_RELABEL = "needs_relabel"
"""A labeled sample waiting for a new mask (``shoal edit --relabel``, the review's relabel queue)."""


def mark_labeled(df: pd.DataFrame, rows: pd.Series, *, round_index: int,
                 mask_paths: Mapping[str, str] | None = None, partial: bool = False) -> None:
    """Label the ``rows`` (a boolean mask over ``df``) in place.

    Rows not labeled before become labeled in ``round_index`` (0 = the initial set) with a training
    weight of 1, or the weight a curation edit gave them before they were labeled; with ``partial``
    their mask holds some regions only. Every row's ``mask_path`` becomes ``mask_paths[sample_id]``
    (None: the dataset's own mask, already in ``mask_path``). A row labeled before (a partial mask
    that grows, a second import of a changed mask) keeps its round and weight.
    """
    new = rows & ~df[LABELED].astype(bool)
    df.loc[new, LABELED] = True
    df.loc[new, ROUND_LABELED] = round_index
    df.loc[new, WEIGHT] = df.loc[new, WEIGHT].where(df.loc[new, WEIGHT] > 0, 1.0)
    if partial:
        df.loc[new, PARTIAL] = True
    if mask_paths is not None:
        df.loc[rows, MASK_PATH] = df.loc[rows, SAMPLE_ID].astype(str).map(mask_paths)


def replace_masks(df: pd.DataFrame, rows: pd.Series, mask_paths: Mapping[str, str]) -> None:
    """Give the labeled ``rows`` new masks (answers to a relabel request): they are no longer
    waiting for one; their round and weight stay."""
    df.loc[rows, MASK_PATH] = df.loc[rows, SAMPLE_ID].astype(str).map(mask_paths)
    df.loc[rows, NEEDS_RELABEL] = False
