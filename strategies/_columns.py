"""Names of the per-sample score columns: defined once, written by the scorer, read by strategies.

Every column holds one float per image. The uncertainty columns are named ``<measure>_<aggregation>``
(``entropy_topk``); :func:`uncertainty_column` builds the name and rejects unknown parts.
"""

from __future__ import annotations

# Pixel-level uncertainty measures.
ENTROPY = "entropy"
"""Softmax entropy of a pixel, in nats (higher = more uncertain)."""
MARGIN = "margin"
"""p(top-1) - p(top-2) of a pixel, in [0, 1] (LOWER = more uncertain)."""
LEAST_CONFIDENCE = "least_confidence"
"""1 - p(top-1) of a pixel, in [0, 1] (higher = more uncertain)."""
MEASURES: tuple[str, ...] = (ENTROPY, MARGIN, LEAST_CONFIDENCE)

# How the pixel values of one image become one number.
MEAN = "mean"
"""Mean over all pixels."""
TOPK = "topk"
"""Mean over the ``TOPK_PIXEL_FRACTION`` most uncertain pixels of the image (for margin: the smallest
margins), so a small uncertain object is not averaged away by a confident background."""
CLASSWEIGHTED = "classweighted"
"""Weighted mean over pixels, a pixel weighing ``w[c]`` for its predicted class ``c``, with
``w[c] = 1 / (labeled pixel share of c + 1e-3)`` normalised to mean 1 over the classes: pixels
predicted as rare classes count more. The scorer takes the shares from the labeled set of the round."""
AGGREGATIONS: tuple[str, ...] = (MEAN, TOPK, CLASSWEIGHTED)

TOPK_PIXEL_FRACTION = 0.10
"""Share of an image's pixels the ``topk`` aggregation averages over."""


def uncertainty_column(measure: str, aggregation: str = MEAN) -> str:
    """The column holding ``measure`` aggregated over an image's pixels by ``aggregation``."""
    if measure not in MEASURES:
        raise ValueError(f"unknown uncertainty measure '{measure}'; valid: {', '.join(MEASURES)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{aggregation}'; valid: {', '.join(AGGREGATIONS)}")
    return f"{measure}_{aggregation}"


ENTROPY_MEAN = uncertainty_column(ENTROPY, MEAN)
ENTROPY_TOPK = uncertainty_column(ENTROPY, TOPK)
ENTROPY_CLASSWEIGHTED = uncertainty_column(ENTROPY, CLASSWEIGHTED)
MARGIN_MEAN = uncertainty_column(MARGIN, MEAN)
MARGIN_TOPK = uncertainty_column(MARGIN, TOPK)
MARGIN_CLASSWEIGHTED = uncertainty_column(MARGIN, CLASSWEIGHTED)
LEAST_CONFIDENCE_MEAN = uncertainty_column(LEAST_CONFIDENCE, MEAN)
LEAST_CONFIDENCE_TOPK = uncertainty_column(LEAST_CONFIDENCE, TOPK)
LEAST_CONFIDENCE_CLASSWEIGHTED = uncertainty_column(LEAST_CONFIDENCE, CLASSWEIGHTED)

UNCERTAINTY_COLUMNS: tuple[str, ...] = tuple(
    uncertainty_column(m, a) for a in AGGREGATIONS for m in MEASURES
)
"""All nine ``<measure>_<aggregation>`` columns, the ``mean`` ones first."""

BALD_MEAN = "bald_mean"
"""Mean over pixels of the BALD mutual information, in nats (higher = more uncertain):
``H[mean_t p_t] - mean_t H[p_t]`` over the ``T`` stochastic forward passes of MC dropout."""

CLASS_FRACTION_PREFIX = "pred_frac_"
"""Prefix of the predicted pixel fraction columns, one per class: ``pred_frac_<class id>``."""

LABEL_FRACTION_PREFIX = "label_frac_"
"""Prefix of the ground-truth pixel fraction columns of labeled images: ``label_frac_<class id>``
(share of the image's non-ignored pixels of that class; written when an image is labeled)."""

FEATURE_PREFIX = "feat_"
"""Prefix of cheap, model-free image features (``feat_<name>``, e.g. colour histogram bins) that the
cold-start strategy spreads its selection over."""

TRAIN_LOSS = "train_loss"
"""Per-sample training loss of the last round's model on a labeled image (mean pixel cross-entropy,
nats), read by the ``loss`` reweighting policy."""


def class_fraction_column(class_id: int) -> str:
    """The column holding the share of an image's pixels predicted as ``class_id``."""
    return f"{CLASS_FRACTION_PREFIX}{class_id}"


def label_fraction_column(class_id: int) -> str:
    """The column holding the share of a labeled image's pixels that are ``class_id``."""
    return f"{LABEL_FRACTION_PREFIX}{class_id}"


def feature_column(name: str) -> str:
    """The column holding the cheap image feature ``name``."""
    return f"{FEATURE_PREFIX}{name}"


# SAM agreement: written by the SAM pass of the pool scorer when a strategy reads one of them.
SAM_DISAGREEMENT = "sam_disagreement"
"""1 - IoU between a predicted component (a connected region of one class) and the mask SAM draws
from that component's box and point prompts, in [0, 1] (higher = the model's outline is less
trustworthy)."""
SAM_AGGREGATIONS: tuple[str, ...] = (MEAN, "max")
"""How the components of one image become one number: area-weighted ``mean``, or the worst (``max``)."""


def sam_disagreement_column(aggregation: str = MEAN) -> str:
    """The column holding SAM disagreement aggregated over an image's components by ``aggregation``."""
    if aggregation not in SAM_AGGREGATIONS:
        raise ValueError(f"unknown SAM aggregation '{aggregation}'; valid: {', '.join(SAM_AGGREGATIONS)}")
    return f"{SAM_DISAGREEMENT}_{aggregation}"


SAM_DISAGREEMENT_MEAN = sam_disagreement_column(MEAN)
"""Area-weighted mean of ``1 - IoU`` over the image's prompted components; NaN when none was prompted."""
SAM_DISAGREEMENT_MAX = sam_disagreement_column("max")
"""The worst component's ``1 - IoU``; NaN when none was prompted."""
SAM_COMPONENTS = "sam_components"
"""Number of predicted components SAM was prompted with (components of at least the minimum area)."""
SAM_EMBEDDING_CACHED = "sam_embedding_cached"
"""1.0 when the image's SAM embedding came from the cache, 0.0 when the image encoder ran."""
SAM_CLASS_PREFIX = "sam_disagreement_class_"
"""Prefix of the per-class breakdown: ``sam_disagreement_class_<class id>``, the area-weighted mean
``1 - IoU`` over that class's components (NaN when the image has none)."""
SAM_COLUMNS: frozenset[str] = frozenset({SAM_DISAGREEMENT_MEAN, SAM_DISAGREEMENT_MAX, SAM_COMPONENTS, SAM_EMBEDDING_CACHED})
"""The fixed-name columns of the SAM pass; a strategy declaring any of them (or the class prefix)
makes the loop run SAM over the pool."""


def sam_class_column(class_id: int) -> str:
    """The column holding the SAM disagreement of ``class_id``'s components."""
    return f"{SAM_CLASS_PREFIX}{class_id}"


def is_sam_column(name: str) -> bool:
    """Whether ``name`` (a column or a column prefix) is written by the SAM pass."""
    return name in SAM_COLUMNS or name.startswith(SAM_CLASS_PREFIX)
