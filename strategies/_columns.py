"""Names of the per-sample score columns: defined once, written by the scorer, read by strategies."""

from __future__ import annotations

ENTROPY_MEAN = "entropy_mean"
"""Mean over pixels of the softmax entropy, in nats (higher = more uncertain)."""

MARGIN_MEAN = "margin_mean"
"""Mean over pixels of p(top-1) - p(top-2), in [0, 1] (lower = more uncertain)."""

LEAST_CONFIDENCE_MEAN = "least_confidence_mean"
"""Mean over pixels of 1 - p(top-1), in [0, 1] (higher = more uncertain)."""

CLASS_FRACTION_PREFIX = "pred_frac_"
"""Prefix of the predicted pixel fraction columns, one per class: ``pred_frac_<class id>``."""

UNCERTAINTY_COLUMNS: tuple[str, ...] = (ENTROPY_MEAN, MARGIN_MEAN, LEAST_CONFIDENCE_MEAN)


def class_fraction_column(class_id: int) -> str:
    """The column holding the share of an image's pixels predicted as ``class_id``."""
    return f"{CLASS_FRACTION_PREFIX}{class_id}"
