"""Names of the per-region columns: defined once, written by the region scorer and the region oracle,
read by the region strategies.

A region table has one row per ``(sample_id, region_id)``: a region is a set of pixels of one image
(a superpixel or a SAM mask) at the scoring resolution, ``region_id`` its value in the image's
int32 region map (``workers.RegionCache``). Uncertainty columns reuse the image-level names of
``strategies.columns`` (``entropy_mean``, ``margin_mean``, ``pred_frac_<c>``), averaged over the
region's pixels instead of the image's.
"""

from __future__ import annotations

from . import _columns as col

SAMPLE_ID = "sample_id"
REGION_ID = "region_id"
"""The region's value in its image's region map: int, 0..K-1."""
KEY_COLUMNS: tuple[str, str] = (SAMPLE_ID, REGION_ID)
"""A region is named by the pair; a region table never holds a pair twice."""

REGION_PIXELS = "region_pixels"
"""Pixels of the region at the scoring resolution."""
ENTROPY_MEAN = col.ENTROPY_MEAN
"""Mean softmax entropy (nats) over the region's pixels."""
MARGIN_MEAN = col.MARGIN_MEAN
"""Mean top-1 minus top-2 probability over the region's pixels (LOWER = more uncertain)."""
CLASS_FRACTION_PREFIX = col.CLASS_FRACTION_PREFIX
"""``pred_frac_<c>``: share of the region's pixels predicted as class ``c``."""
DOMINANT_CLASS = "pred_dominant_class"
"""The class predicted for most of the region's pixels (ties: the lowest id)."""
DOMINANT_FRACTION = "pred_dominant_frac"
"""Share of the region's pixels predicted as ``pred_dominant_class``, in (0, 1]: the predicted purity."""
CLASS_BALANCED = "entropy_class_balanced"
"""``entropy_mean * w[pred_dominant_class]`` with ``w[c] = 1 / (labeled pixel share of c + 1e-3)``
normalised to mean 1 over the classes (Cai et al., CVPR 2021: uncertainty weighted by the inverse
labeled frequency of the region's dominant predicted class). Equals ``entropy_mean`` when nothing
is labeled yet (all weights 1)."""
COST_CLICKS = "cost_clicks"
"""Estimated annotation cost of the region in clicks (``strategies.CostModel``): one click when the
predicted purity reaches the cost model's ``purity_threshold``, else the click plus the polygons of
the predicted classes inside the region. Selection spends the click budget by this estimate."""
LABELED_FRACTION = "labeled_frac"
"""Share of the region's pixels already labeled (not the ignore index) in the image's partial mask."""
LABELED = "labeled"
"""bool: the region was labeled in an earlier round; region strategies never select it."""

# Written by the simulated region oracle, one row per labeled region.
LABEL_CLASS = "label_class"
"""The dominant ground-truth class of the region (-1 when all its pixels are ignored in the truth)."""
PURITY = "purity"
"""Share of the region's non-ignored ground-truth pixels that are ``label_class``."""
MIXED = "mixed"
"""bool: purity below the threshold, so the region was drawn in full (its true pixels revealed)."""
LABELED_PIXELS = "labeled_pixels"
"""Pixels this labeling added to the image's partial mask."""
CLICKS = "clicks"
"""Clicks the labeling cost (the actual cost, known only once the truth is seen)."""
