"""Training weight policies: pure functions from the sample table to per-sample weights.

A policy returns a float64 Series named ``weight`` indexed by the ``sample_id`` of the labeled rows
(in table order); 0 means "never drawn in training, but still labeled". The loop writes it into the
table's ``weight`` column, logs it, and applies :func:`manual_override` last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from . import _columns as col
from ._base import ID_COLUMN, LABELED_COLUMN
from ._registry import Registry

WEIGHT = "weight"

Policy = Callable[..., pd.Series]
P = TypeVar("P", bound=Policy)
REGISTRY: Registry[Policy] = Registry("reweighting policy", positional=1)
"""``policy(table, *, options...) -> Series`` by name."""


def register_reweighting(name: str) -> Callable[[P], P]:
    """Decorator adding ``policy(table, *, options...) -> Series`` under ``name`` (unique)."""

    def add(policy: P) -> P:
        REGISTRY.register(name)(policy)
        return policy

    return add


def reweighting_names() -> list[str]:
    return REGISTRY.names()


def reweighting_options(name: str) -> dict[str, Any]:
    """The options of policy ``name`` with their defaults."""
    return REGISTRY.options(name)


def compute_weights(name: str, table: pd.DataFrame, **options: Any) -> pd.Series:
    """Weights of the labeled rows of ``table`` by the registered policy ``name`` with ``options``.

    An unknown name or option is a ``ValueError`` listing the valid ones.
    """
    weights: pd.Series = REGISTRY.build(name, table, **options)
    return weights


def _labeled(table: pd.DataFrame) -> pd.DataFrame:
    if ID_COLUMN not in table.columns or LABELED_COLUMN not in table.columns:
        raise ValueError(f"reweighting needs the columns '{ID_COLUMN}' and '{LABELED_COLUMN}'")
    return table[table[LABELED_COLUMN].to_numpy(dtype=bool, na_value=False)]


def _series(rows: pd.DataFrame, values: np.ndarray) -> pd.Series:
    return pd.Series(np.asarray(values, dtype=np.float64), index=pd.Index(rows[ID_COLUMN], name=ID_COLUMN), name=WEIGHT)


def _check_ratio(policy: str, max_ratio: float) -> float:
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not np.isfinite(max_ratio) or max_ratio < 1:
        raise ValueError(f"reweighting policy '{policy}': option 'max_ratio' must be a number >= 1, got {max_ratio!r}")
    return float(max_ratio)


@register_reweighting("uniform")
def uniform_weights(table: pd.DataFrame) -> pd.Series:
    """1.0 for every labeled row."""
    rows = _labeled(table)
    return _series(rows, np.ones(len(rows)))


@register_reweighting("loss")
def loss_weights(table: pd.DataFrame, *, offset: float = 0.1, max_ratio: float = 10.0) -> pd.Series:
    """Hard examples more often: weight = ``train_loss + offset``, clipped to a band of width
    ``max_ratio`` (max / min) centred geometrically on the median, then scaled to mean 1.

    A labeled row without a loss yet (labeled this round) gets the median loss.
    """
    max_ratio = _check_ratio("loss", max_ratio)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not np.isfinite(offset) or offset < 0:
        raise ValueError(f"reweighting policy 'loss': option 'offset' must be a number >= 0, got {offset!r}")
    if col.TRAIN_LOSS not in table.columns:
        raise ValueError(f"reweighting policy 'loss' needs the per-sample loss column '{col.TRAIN_LOSS}'")
    rows = _labeled(table)
    loss = rows[col.TRAIN_LOSS].to_numpy(np.float64)
    bad = (loss < 0) | np.isinf(loss)
    if bad.any():
        sid = rows[ID_COLUMN].iloc[int(np.argmax(bad))]
        raise ValueError(f"reweighting policy 'loss': sample_id {sid!r} has loss {loss[bad][0]}, expected a finite value >= 0")
    known = np.isfinite(loss)
    if not known.any():
        return _series(rows, np.ones(len(rows)))
    w = np.where(known, loss, np.median(loss[known])) + offset
    middle = float(np.median(w))
    if middle > 0:
        low, high = middle / np.sqrt(max_ratio), middle * np.sqrt(max_ratio)
    else:  # more than half the weights are 0: lift them to max / max_ratio
        high = float(w.max())
        low = high / max_ratio
    if high <= 0:
        return _series(rows, np.ones(len(rows)))
    w = np.clip(w, low, high)
    return _series(rows, w / w.mean())


@register_reweighting("class_content")
def class_content_weights(table: pd.DataFrame, *, max_ratio: float = 10.0, min_share: float = 0.0) -> pd.Series:
    """Images with rare classes more often: an image's weight is ``max over the classes it contains
    (share > min_share) of f_max / f_c``, ``f_c`` being class c's share of all labeled pixels, capped
    at ``max_ratio``; then scaled to mean 1.

    Class shares per image come from ``label_frac_<c>`` where present, else ``pred_frac_<c>``.
    """
    max_ratio = _check_ratio("class_content", max_ratio)
    if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) or not 0 <= min_share < 1:
        raise ValueError(f"reweighting policy 'class_content': option 'min_share' must be in [0, 1), got {min_share!r}")
    rows = _labeled(table)
    shares = _class_shares(rows)
    freq = np.nanmean(shares, axis=0) if len(rows) else np.zeros(shares.shape[1])
    present = np.nan_to_num(shares, nan=0.0) > min_share
    with np.errstate(divide="ignore"):
        inverse = np.where(freq > 0, np.nanmax(freq, initial=0.0) / freq, 0.0)
    w = np.where(present, inverse[None, :], 0.0).max(axis=1, initial=0.0)
    w = np.clip(np.where(w > 0, w, 1.0), 1.0, max_ratio)
    return _series(rows, w / w.mean() if len(w) else w)


def _class_shares(rows: pd.DataFrame) -> np.ndarray:
    """float64 [rows, C]: per-image class shares, true where known, else predicted."""
    classes = sorted(
        {int(str(c)[len(p):]) for p in (col.LABEL_FRACTION_PREFIX, col.CLASS_FRACTION_PREFIX)
         for c in rows.columns if str(c).startswith(p) and str(c)[len(p):].isdigit()}
    )
    if not classes:
        raise ValueError(
            f"reweighting policy 'class_content' needs class share columns "
            f"'{col.LABEL_FRACTION_PREFIX}<c>' or '{col.CLASS_FRACTION_PREFIX}<c>'"
        )
    out = np.full((len(rows), len(classes)), np.nan)
    for j, c in enumerate(classes):
        for name in (col.label_fraction_column(c), col.class_fraction_column(c)):
            if name in rows.columns:
                values = rows[name].to_numpy(np.float64)
                out[:, j] = np.where(np.isnan(out[:, j]), values, out[:, j])
    return out


def manual_override(weights: pd.Series, overrides: Mapping[str, float]) -> pd.Series:
    """``weights`` with some samples' weights set by hand (applied after the policy).

    0 excludes a sample from training but keeps it labeled. An id not in ``weights`` (unknown or not
    labeled) or a negative or non-finite weight is a ``ValueError`` naming the id; so is a result
    where every weight is 0.
    """
    for sid, value in overrides.items():
        if sid not in weights.index:
            raise ValueError(f"weight override for sample_id {sid!r}: not a labeled sample")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value < 0:
            raise ValueError(f"weight override for sample_id {sid!r}: {value!r} is not a finite number >= 0")
    out = weights.astype(np.float64).copy()
    if overrides:
        out.loc[list(overrides)] = [float(v) for v in overrides.values()]
    if len(out) and not (out > 0).any():
        raise ValueError("weight overrides leave every labeled sample at weight 0: nothing to train on")
    return out
