"""Region selection: which regions, across the pool, to label under a budget of clicks.

The image-level contract (one row per sample, a budget in samples) does not fit regions, so region
strategies have their own small contract and registry, in the same style: a strategy declares the
columns it reads, writes one method (:meth:`RegionStrategy.priority`), and the base class does the
rest. The input is a table with one row per region (``strategies.region_columns``): ``sample_id``,
``region_id``, the declared score columns, ``cost_clicks`` (the estimated cost of labeling the
region) and optionally a boolean ``labeled`` (labeled regions are never selected).

Selection is greedy by priority per click (or by priority alone, for ``region_random``): regions are
taken in descending order of that key, each one that still fits in the budget, until nothing left
fits; the clicks spent never exceed the budget. Rows are put in ``(sample_id, region_id)`` order
first, so the result depends only on the table's content, the budget and the state of ``rng``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd

from . import _region_columns as rcol
from ._base import REGISTRY as IMAGE_REGISTRY
from ._base import Requirements, as_priority, descending_order, tie_order
from ._registry import Registry

__all__ = [
    "RegionStrategy",
    "build_region_strategy",
    "register_region_strategy",
    "region_strategy_class",
    "region_strategy_names",
    "region_strategy_options",
]

_BUDGET_SLACK = 1e-9
"""Relative tolerance on the budget, so costs summed in another order do not miss by one ulp."""


class RegionStrategy(ABC):
    """Selects regions to label from a table of per-region scores under a click budget.

    A subclass sets ``required_columns`` (or sets them per instance from its options) and writes
    :meth:`priority`; ``per_click`` says whether the greedy key is priority per click (the default)
    or the priority alone.
    """

    name: ClassVar[str] = ""
    required_columns: tuple[str, ...] = ()
    """Score columns the region scorer must write for this strategy (``strategies.region_columns``)."""
    per_click: ClassVar[bool] = True
    """Rank by ``priority / cost_clicks``; False: by ``priority`` alone (cost only limits the budget)."""

    def requirements(self) -> Requirements:
        """What the loop must provide: the declared columns plus the keys and the cost column."""
        return Requirements(columns=frozenset({*self.required_columns, rcol.COST_CLICKS}))

    @abstractmethod
    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        """float64 [len(candidates)], >= 0 for per-click strategies: higher is wanted more, NaN last.

        ``candidates`` holds the unlabeled regions in ``(sample_id, region_id)`` order with the
        declared columns.
        """

    def explain(self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray) -> list[str]:
        """One short reason per selected candidate position; override to show the column read."""
        return [f"{self.name} {priority[p]:.3g}" for p in positions]

    def select(self, table: pd.DataFrame, budget: float, rng: np.random.Generator) -> pd.DataFrame:
        """The regions to label, in selection order, spending at most ``budget`` clicks.

        Returns a frame ``[sample_id, region_id, rank, priority, cost_clicks, cumulative_clicks,
        reason]`` (``rank`` from 1). Raises ``ValueError`` when the budget is not a positive number
        of clicks, a declared column is missing, a region appears twice or a cost is not a positive
        finite number.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) \
                or not np.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget must be a positive number of clicks, got {budget!r}")
        budget = float(budget)
        candidates = self._candidates(table)
        if len(candidates) > 1:  # ties (equal priority per click) fall to a seeded draw, not to id order
            candidates = candidates.take(tie_order(rng).permutation(len(candidates))).reset_index(drop=True)
        n = len(candidates)
        cost = candidates[rcol.COST_CLICKS].to_numpy(np.float64)
        priority = as_priority(self.priority(candidates, rng), n, self.name)
        if self.per_click and np.isfinite(priority[priority < 0]).any():
            raise ValueError(f"region strategy '{self.name}': priorities must be >= 0 to be divided by clicks, "
                             f"got {priority[priority < 0].min():.3g}")
        key = priority / cost if self.per_click else priority
        chosen = _greedy(key, cost, budget)
        spent = np.cumsum(cost[chosen])
        return pd.DataFrame({
            rcol.SAMPLE_ID: candidates[rcol.SAMPLE_ID].to_numpy()[chosen].astype(str),
            rcol.REGION_ID: candidates[rcol.REGION_ID].to_numpy()[chosen].astype(np.int64),
            "rank": np.arange(1, len(chosen) + 1),
            "priority": priority[chosen],
            rcol.COST_CLICKS: cost[chosen],
            "cumulative_clicks": spent,
            "reason": self.explain(candidates, priority, chosen),
        })

    def _candidates(self, table: pd.DataFrame) -> pd.DataFrame:
        names = [str(c) for c in table.columns]
        needed = [*rcol.KEY_COLUMNS, *sorted(self.requirements().columns)]
        missing = [c for c in needed if c not in names]
        if missing:
            raise ValueError(f"region strategy '{self.name}' needs columns {missing}; the table has {sorted(names)}")
        keys = table[list(rcol.KEY_COLUMNS)]
        if keys.isna().any().any():
            raise ValueError("the region table has rows without a sample_id or region_id")
        frame = table[[c for c in names if c in {*needed, rcol.LABELED}]]
        frame = frame.assign(**{rcol.SAMPLE_ID: frame[rcol.SAMPLE_ID].astype(str),
                                rcol.REGION_ID: frame[rcol.REGION_ID].astype(np.int64)})
        frame = frame.sort_values(list(rcol.KEY_COLUMNS), kind="stable", ignore_index=True)
        dup = frame.duplicated(list(rcol.KEY_COLUMNS))
        if dup.any():
            row = frame.loc[int(np.argmax(dup.to_numpy()))]
            raise ValueError(f"region ({row[rcol.SAMPLE_ID]!r}, {int(row[rcol.REGION_ID])}) appears twice in the region table")
        if rcol.LABELED in frame.columns:
            labeled = frame[rcol.LABELED].to_numpy(dtype=bool, na_value=False)
            frame = frame.loc[~labeled].reset_index(drop=True)
        cost = frame[rcol.COST_CLICKS].to_numpy(np.float64)
        bad = ~(np.isfinite(cost) & (cost > 0))
        if bad.any():
            row = frame.loc[int(np.argmax(bad))]
            raise ValueError(
                f"region ({row[rcol.SAMPLE_ID]!r}, {int(row[rcol.REGION_ID])}): {rcol.COST_CLICKS} must be a positive "
                f"finite number of clicks, got {cost[bad][0]!r}"
            )
        return frame


def _greedy(key: np.ndarray, cost: np.ndarray, budget: float) -> np.ndarray:
    """int64 positions taken: by descending ``key`` (ties by position), each that still fits."""
    order = descending_order(key)
    limit = budget * (1 + _BUDGET_SLACK)
    spent = np.cumsum(cost[order])
    # The leading run that fits, at once; then one by one through the rest while anything fits.
    n_head = int(np.searchsorted(spent, limit, side="right"))
    taken = [order[:n_head]]
    left = limit - (spent[n_head - 1] if n_head else 0.0)
    rest = order[n_head:]
    if len(rest):
        cheapest_after = np.minimum.accumulate(cost[rest][::-1])[::-1]
        extra = []
        for i, pos in enumerate(rest):
            if cheapest_after[i] > left:
                break
            if cost[pos] <= left:
                extra.append(pos)
                left -= cost[pos]
        taken.append(np.asarray(extra, dtype=np.int64))
    return np.concatenate(taken).astype(np.int64)


# -- strategies ----------------------------------------------------------------------------------------


REGISTRY: Registry[type[RegionStrategy]] = Registry("region strategy")
REGISTRY.share_namespace(IMAGE_REGISTRY)  # a config names either kind of strategy by name alone
R = TypeVar("R", bound=type[RegionStrategy])


def register_region_strategy(name: str) -> Callable[[R], R]:
    """Class decorator adding a region strategy under ``name``, unique across both registries (a
    config names either kind of strategy by name alone). Options are keyword-only with defaults."""

    def add(cls: R) -> R:
        REGISTRY.register(name)(cls)
        cls.name = name
        return cls

    return add


def region_strategy_names() -> list[str]:
    return REGISTRY.names()


def region_strategy_class(name: str) -> type[RegionStrategy]:
    return REGISTRY.get(name)


def region_strategy_options(name: str) -> dict[str, Any]:
    """The options of region strategy ``name`` with their defaults."""
    return REGISTRY.options(name)


def build_region_strategy(name: str, **options: Any) -> RegionStrategy:
    """An instance of the registered region strategy ``name``; an unknown name or option lists the valid ones."""
    strategy: RegionStrategy = REGISTRY.build(name, **options)
    return strategy


@register_region_strategy("region_random")
class RegionRandomStrategy(RegionStrategy):
    """Uniformly random regions until the budget is spent: the baseline (cost limits, never ranks)."""

    per_click = False

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return rng.random(len(candidates))

    def explain(self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray) -> list[str]:
        return [f"random draw {priority[p]:.3g}" for p in positions]


_MEASURES = ("entropy", "margin")


@register_region_strategy("region_uncertainty")
class RegionUncertaintyStrategy(RegionStrategy):
    """Most uncertain regions per click: mean pixel entropy, or ``1 - margin_mean`` (``measure``)."""

    def __init__(self, *, measure: str = "entropy") -> None:
        if measure not in _MEASURES:
            raise ValueError(f"region strategy '{self.name}': option 'measure' must be one of {', '.join(_MEASURES)}; "
                             f"got {measure!r}")
        self.measure = measure
        self.column = rcol.ENTROPY_MEAN if measure == "entropy" else rcol.MARGIN_MEAN
        self.required_columns = (self.column,)

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        values = candidates[self.column].to_numpy(np.float64)
        return values if self.measure == "entropy" else 1.0 - values

    def explain(self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray) -> list[str]:
        values = candidates[self.column].to_numpy(np.float64)
        cost = candidates[rcol.COST_CLICKS].to_numpy(np.float64)
        return [f"{self.column} {values[p]:.3g}, {cost[p]:.3g} clicks" for p in positions]


@register_region_strategy("region_class_balanced")
class RegionClassBalancedStrategy(RegionStrategy):
    """Most uncertain regions per click, uncertainty weighted by the inverse labeled frequency of the
    region's dominant predicted class (Cai et al., CVPR 2021): reads ``entropy_class_balanced``."""

    required_columns = (rcol.CLASS_BALANCED, rcol.DOMINANT_CLASS)

    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        return candidates[rcol.CLASS_BALANCED].to_numpy(np.float64)

    def explain(self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray) -> list[str]:
        cost = candidates[rcol.COST_CLICKS].to_numpy(np.float64)
        dominant = candidates[rcol.DOMINANT_CLASS].to_numpy()
        return [f"{rcol.CLASS_BALANCED} {priority[p]:.3g} (predicted class {int(dominant[p])}), {cost[p]:.3g} clicks"
                for p in positions]
