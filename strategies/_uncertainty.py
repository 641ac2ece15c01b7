"""Random and image-level uncertainty strategies."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import _columns as col
from ._base import Strategy, register_strategy


@register_strategy("random")
class RandomStrategy(Strategy):
    """Uniformly random, the baseline every other strategy must beat."""

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return rng.random(len(candidates))


@register_strategy("entropy")
class EntropyStrategy(Strategy):
    """Highest mean pixel entropy first."""

    required_columns = (col.ENTROPY_MEAN,)

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return candidates[col.ENTROPY_MEAN].to_numpy(np.float64)


@register_strategy("margin")
class MarginStrategy(Strategy):
    """Smallest mean top-1/top-2 probability margin first."""

    required_columns = (col.MARGIN_MEAN,)

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return -candidates[col.MARGIN_MEAN].to_numpy(np.float64)


@register_strategy("least_confidence")
class LeastConfidenceStrategy(Strategy):
    """Highest mean 1 - p(top-1) first."""

    required_columns = (col.LEAST_CONFIDENCE_MEAN,)

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return candidates[col.LEAST_CONFIDENCE_MEAN].to_numpy(np.float64)
