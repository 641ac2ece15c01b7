"""The strategy contract: a pure function from a per-sample score table and a budget to ids."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import numpy as np
import pandas as pd

ID_COLUMN = "sample_id"
LABELED_COLUMN = "labeled"


class Strategy(ABC):
    """Selects the next samples to label from a table of per-sample scores.

    Subclasses write one method, :meth:`priority`, and declare the score columns it reads in
    ``required_columns``. The base class does the shared work: it drops labeled rows, checks the
    budget and the declared columns, ranks NaN priorities last, and breaks ties by ``sample_id`` so a
    selection is reproducible. Strategies do no I/O and import neither torch nor Ray.
    """

    name: ClassVar[str] = ""
    required_columns: ClassVar[tuple[str, ...]] = ()
    """Score columns the scorer must produce for this strategy (see ``strategies.columns``)."""

    def select(self, table: pd.DataFrame, budget: int, rng: np.random.Generator) -> list[str]:
        """Return exactly ``budget`` distinct unlabeled sample ids, highest priority first.

        ``table`` has one row per candidate sample with a ``sample_id`` column, the declared score
        columns and optionally a boolean ``labeled`` column (labeled rows are never selected).
        Raises ``ValueError`` when the budget is not a positive integer or exceeds the candidates.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
            raise ValueError(f"budget must be a positive number of samples, got {budget!r}")
        missing = [c for c in (ID_COLUMN, *self.required_columns) if c not in table.columns]
        if missing:
            raise ValueError(
                f"strategy '{self.name}' needs score columns {missing}; "
                f"the table has {sorted(map(str, table.columns))}"
            )
        if table[ID_COLUMN].duplicated().any():
            dup = table[ID_COLUMN][table[ID_COLUMN].duplicated()].iloc[0]
            raise ValueError(f"duplicate sample_id {dup!r} in the score table")
        candidates = table
        if LABELED_COLUMN in table.columns:
            candidates = table[~table[LABELED_COLUMN].astype(bool)]
        if budget > len(candidates):
            raise ValueError(
                f"budget of {budget} samples exceeds the {len(candidates)} unlabeled samples left"
            )
        candidates = candidates.sort_values(ID_COLUMN, kind="stable")
        priority = np.asarray(self.priority(candidates, rng), dtype=np.float64)
        if priority.shape != (len(candidates),):
            raise AssertionError(f"{self.name}: priority shape {priority.shape} != ({len(candidates)},)")
        # NaN (e.g. an image the scorer could not score) goes last; among equals, sample_id order.
        priority = np.where(np.isnan(priority), -np.inf, priority)
        order = np.argsort(-priority, kind="stable")[:budget]
        return [str(s) for s in candidates[ID_COLUMN].to_numpy()[order]]

    @abstractmethod
    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        """Per-candidate priority, float64 [len(candidates)]: higher is selected first."""


_REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator adding a strategy to the registry under ``name`` (unique)."""

    def add(cls: S) -> S:
        if name in _REGISTRY:
            raise ValueError(f"strategy '{name}' is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def build_strategy(name: str) -> Strategy:
    """An instance of the registered strategy ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy '{name}'; registered: {', '.join(strategy_names())}")
    return _REGISTRY[name]()


def strategy_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy '{name}'; registered: {', '.join(strategy_names())}")
    return _REGISTRY[name]
