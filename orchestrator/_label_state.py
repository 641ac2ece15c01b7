"""The one place where a sample's label state changes: labeled, the round it was labeled in, its
training weight on labeling, the mask it trains on, a partial (region) mask, a mask sent back for
relabeling, and, without a validation folder, whether a newly labeled image is held out for
validation. The start, the simulated oracle, imports from people and region labels all go through
these functions, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import pandas as pd

from ._config import Config
from ._table import LABELED, MASK_PATH, ROUND_LABELED, SAMPLE_ID, SPLIT, TRAIN_SPLIT, VAL_SPLIT, WEIGHT

PARTIAL = "partial"
"""Region runs: the training mask holds only some regions (the image stays in the pool)."""
NEEDS_RELABEL = "needs_relabel"
"""A labeled sample waiting for a new mask (``shoal edit --relabel``, the review's relabel queue)."""


def holdout_share(config: Config) -> float | None:
    """The share of labeled pool images held out for validation: ``data.val_share`` when the
    experiment has no validation folder (and no synthetic validation split), else None."""
    if config.data.kind == "folder" and config.data.val_dir is None:
        return config.data.val_share
    return None


def holdout_score(sample_id: str) -> float:
    """A number in [0, 1) fixed by the sample id alone: an image is held out when it falls below
    the share, so it never moves between training and validation whatever the order of labeling."""
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:13], 16) / 16**13


def mark_labeled(df: pd.DataFrame, rows: pd.Series, *, round_index: int, config: Config,
                 mask_paths: Mapping[str, str] | None = None, partial: bool = False) -> None:
    """Label the ``rows`` (a boolean mask over ``df``) in place.

    Rows not labeled before become labeled in ``round_index`` (0 = the initial or seed set) with a
    training weight of 1, or the weight a curation edit gave them before they were labeled; with
    ``partial`` their mask holds some regions only. Every row's ``mask_path`` becomes
    ``mask_paths[sample_id]`` (None: the mask already in ``mask_path``). A row labeled before (a
    partial mask that grows, a second import of a changed mask) keeps its round and weight.

    Without a validation folder (:func:`holdout_share`), a newly labeled whole image whose
    :func:`holdout_score` falls below the share joins the validation split instead (never trained
    on; ``round_labeled`` records when); and once two images are labeled and none is held out, the
    new one with the lowest score is, so validation is never empty.
    """
    new = rows & ~df[LABELED].astype(bool)
    df.loc[new, LABELED] = True
    df.loc[new, ROUND_LABELED] = round_index
    df.loc[new, WEIGHT] = df.loc[new, WEIGHT].where(df.loc[new, WEIGHT] > 0, 1.0)
    if partial:
        df.loc[new, PARTIAL] = True
    if mask_paths is not None:
        df.loc[rows, MASK_PATH] = df.loc[rows, SAMPLE_ID].astype(str).map(mask_paths)
    share = holdout_share(config)
    if share is None or partial or not new.any():
        return
    ids = df.loc[new, SAMPLE_ID].astype(str)
    scores = ids.map(holdout_score)
    held = scores.index[scores.to_numpy() < share]
    labeled_train = int((df[LABELED].astype(bool) & (df[SPLIT] == TRAIN_SPLIT)).sum())
    if not len(held) and not (df[SPLIT] == VAL_SPLIT).any() and labeled_train >= 2:
        held = pd.Index([scores.idxmin()])
    if len(held) >= labeled_train and labeled_train > 0:  # keep one to train on
        held = pd.Index(scores.loc[held].sort_values().index[: labeled_train - 1])
    _to_validation(df, held)


def _to_validation(df: pd.DataFrame, index: pd.Index) -> None:
    if not len(index):
        return
    df.loc[index, SPLIT] = VAL_SPLIT
    df.loc[index, LABELED] = False
    df.loc[index, WEIGHT] = 0.0


def replace_masks(df: pd.DataFrame, rows: pd.Series, mask_paths: Mapping[str, str]) -> None:
    """Give the labeled ``rows`` new masks (answers to a relabel request): they are no longer
    waiting for one; their round and weight stay."""
    df.loc[rows, MASK_PATH] = df.loc[rows, SAMPLE_ID].astype(str).map(mask_paths)
    df.loc[rows, NEEDS_RELABEL] = False
