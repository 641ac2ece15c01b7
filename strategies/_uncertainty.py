"""Random and image-level uncertainty strategies."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import _columns as col
from ._base import ScoreStrategy, check_number, register_strategy


@register_strategy("random")
class RandomStrategy(ScoreStrategy):
    """Uniformly random, the baseline every other strategy must beat."""

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return rng.random(len(candidates))

    def explain(
        self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray, ranks: np.ndarray
    ) -> list[str]:
        return [f"random draw (rank {r})" for r in ranks]


class _ColumnStrategy(ScoreStrategy):
    """Reads one uncertainty column; ``higher_is_uncertain`` says which way it points."""

    measure = ""
    higher_is_uncertain = True

    def __init__(self, *, aggregation: str = col.MEAN) -> None:
        if aggregation not in col.AGGREGATIONS:
            raise ValueError(
                f"strategy '{self.name}': option 'aggregation' must be one of "
                f"{', '.join(col.AGGREGATIONS)}; got {aggregation!r}"
            )
        self.aggregation = aggregation
        self.column = col.uncertainty_column(self.measure, aggregation)
        self.required_columns = (self.column,)

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        values = candidates[self.column].to_numpy(np.float64)
        return values if self.higher_is_uncertain else -values

    def explain(
        self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray, ranks: np.ndarray
    ) -> list[str]:
        values = candidates[self.column].to_numpy(np.float64)
        return [f"{self.column} {values[p]:.3g} (rank {r})" for p, r in zip(positions, ranks)]


@register_strategy("entropy")
class EntropyStrategy(_ColumnStrategy):
    """Highest pixel entropy first, aggregated per image by ``aggregation`` (mean | topk | classweighted)."""

    measure = col.ENTROPY


@register_strategy("margin")
class MarginStrategy(_ColumnStrategy):
    """Smallest top-1/top-2 probability margin first, aggregated per image by ``aggregation``."""

    measure = col.MARGIN
    higher_is_uncertain = False


@register_strategy("least_confidence")
class LeastConfidenceStrategy(_ColumnStrategy):
    """Highest 1 - p(top-1) first, aggregated per image by ``aggregation``."""

    measure = col.LEAST_CONFIDENCE


@register_strategy("bald")
class BaldStrategy(ScoreStrategy):
    """Highest mean pixel mutual information (BALD) first, from ``mc_dropout_passes`` MC-dropout passes.

    The scorer reads ``requirements().mc_dropout_passes`` and writes ``bald_mean``.
    """

    required_columns = (col.BALD_MEAN,)

    def __init__(self, *, mc_dropout_passes: int = 8) -> None:
        self.mc_dropout_passes = int(check_number(self.name, "mc_dropout_passes", mc_dropout_passes,
                                                  minimum=2, integer=True))

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return candidates[col.BALD_MEAN].to_numpy(np.float64)

    def explain(
        self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray, ranks: np.ndarray
    ) -> list[str]:
        return [f"{col.BALD_MEAN} {priority[p]:.3g} (rank {r})" for p, r in zip(positions, ranks)]
