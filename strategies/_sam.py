"""SAM disagreement: images whose predicted outlines SAM would redraw the most come first."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import _columns as col
from ._base import ScoreStrategy, register_strategy


@register_strategy("sam_disagreement")
class SamDisagreementStrategy(ScoreStrategy):
    """Highest SAM disagreement first: ``1 - IoU`` between each predicted component and SAM's mask
    for that component's prompts, aggregated per image by ``aggregation`` (``mean``, area-weighted,
    or ``max``, the worst component), or, with ``class_id``, the breakdown for that class only.

    Declaring a SAM column is what makes the loop run SAM over the pool (``sam.enabled`` must be on).
    Images with no prompted component (NaN) come last.
    """

    def __init__(self, *, aggregation: str = col.MEAN, class_id: int | None = None) -> None:
        if aggregation not in col.SAM_AGGREGATIONS:
            raise ValueError(
                f"strategy '{self.name}': option 'aggregation' must be one of "
                f"{', '.join(col.SAM_AGGREGATIONS)}; got {aggregation!r}"
            )
        if class_id is not None and (isinstance(class_id, bool) or not isinstance(class_id, int) or class_id < 0):
            raise ValueError(f"strategy '{self.name}': option 'class_id' must be a class id >= 0 or null, got {class_id!r}")
        if class_id is not None and aggregation != col.MEAN:
            raise ValueError(f"strategy '{self.name}': the per-class breakdown is an area-weighted mean; "
                             f"drop option 'aggregation' ({aggregation!r}) or 'class_id'")
        self.aggregation = aggregation
        self.class_id = class_id
        self.column = col.sam_disagreement_column(aggregation) if class_id is None else col.sam_class_column(class_id)
        self.required_columns = (self.column,)

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return candidates[self.column].to_numpy(np.float64)

    def explain(
        self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray, ranks: np.ndarray
    ) -> list[str]:
        values = candidates[self.column].to_numpy(np.float64)
        return [f"{self.column} {values[p]:.3g} (rank {r})" for p, r in zip(positions, ranks)]
