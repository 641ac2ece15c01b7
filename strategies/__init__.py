"""Selection strategies: pure functions of a per-sample score table (no torch, no Ray, no I/O)."""

from . import _columns as columns
from ._base import Strategy, build_strategy, register_strategy, strategy_class, strategy_names
from ._uncertainty import (
    EntropyStrategy,
    LeastConfidenceStrategy,
    MarginStrategy,
    RandomStrategy,
)

__all__ = [
    "EntropyStrategy",
    "LeastConfidenceStrategy",
    "MarginStrategy",
    "RandomStrategy",
    "Strategy",
    "build_strategy",
    "columns",
    "register_strategy",
    "strategy_class",
    "strategy_names",
]
