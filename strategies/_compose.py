"""Strategies that wrap others: weighted rank fusion and stochastic batch sampling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._base import (
    Pool,
    Ranking,
    Strategy,
    StrategySpec,
    build_member,
    check_number,
    register_strategy,
    top_order,
)


@register_strategy("fusion")
class FusionStrategy(Strategy):
    """Weighted rank fusion: each member ranks every candidate; priority = sum_i w_i (1 - rank_i / n).

    ``members`` maps a strategy name to its weight (>= 0, at least one > 0), or to a mapping with
    ``weight`` and that strategy's options: ``{"entropy": {"weight": 0.7, "aggregation": "topk"},
    "class_balance": 0.3}``. Ranks (0 = best) make members with different score scales comparable.
    Members run in the given order on the same generator.
    """

    def __init__(self, *, members: Mapping[str, Any] | None = None) -> None:
        if members is None:
            members = {"entropy": 0.7, "class_balance": 0.3}
        if not isinstance(members, Mapping) or not members:
            raise ValueError(f"strategy '{self.name}': option 'members' must map strategy names to weights, got {members!r}")
        built: list[Strategy] = []
        weights: list[float] = []
        for name, value in members.items():
            if isinstance(value, Mapping):
                options = dict(value)
                if "weight" not in options:
                    raise ValueError(f"strategy '{self.name}': member '{name}' needs a 'weight', got {value!r}")
                weight = options.pop("weight")
                spec: StrategySpec = {"name": name, **options}
            else:
                weight, spec = value, name
            weights.append(float(check_number(self.name, f"members.{name}", weight, minimum=0)))
            built.append(build_member(spec, self.name, f"members.{name}"))
        if not any(w > 0 for w in weights):
            raise ValueError(f"strategy '{self.name}': at least one member weight must be > 0, got {dict(members)!r}")
        self.members = tuple(built)
        self.weights = tuple(weights)

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        n = len(pool)
        rankings = [m.rank(pool, budget, rng) for m in self.members]
        member_ranks = [r.ranks() for r in rankings]
        priority = np.zeros(n)
        for w, ranks in zip(self.weights, member_ranks):
            priority += w * (1.0 - ranks / n)

        def explain(positions: np.ndarray, ranks: np.ndarray) -> list[str]:
            return [
                f"fusion {priority[p]:.3g}: "
                + ", ".join(f"{m.name} rank {int(mr[p]) + 1}" for m, mr in zip(self.members, member_ranks))
                for p in positions
            ]

        return Ranking(priority=priority, head=top_order(priority, budget), explain=explain)


class _SamplingStrategy(Strategy):
    """Samples ``budget`` ids without replacement, P(i) proportional to ``exp(log_weight(priority_i))``
    of a base strategy's priority, by the Gumbel top-k trick: ``argtop-k(log_weight + Gumbel)``
    equals sequential sampling without replacement. Candidates the base cannot score come last."""

    def __init__(self, base: StrategySpec) -> None:
        self.base = build_member(base, self.name, "base")
        self.members = (self.base,)

    def log_weight(self, priority: np.ndarray) -> np.ndarray:
        """float64 [n] log-weights of the finite ``priority`` values."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        inner = self.base.rank(pool, budget, rng)
        priority = inner.priority
        finite = np.isfinite(priority)
        key = np.full(len(priority), -np.inf)
        if finite.any():
            key[finite] = self.log_weight(priority[finite])
        key += rng.gumbel(size=len(priority))  # -inf stays -inf
        head = top_order(key, budget)

        def explain(positions: np.ndarray, ranks: np.ndarray) -> list[str]:
            base = inner.reasons(positions, self.base.name)
            return [f"{self.describe()} draw {r}: {why}" for r, why in zip(ranks, base)]

        return Ranking(priority=priority, head=head, key=key, explain=explain)


@register_strategy("power")
class PowerSamplingStrategy(_SamplingStrategy):
    """Stochastic batch: P(i) proportional to (priority_i - min priority + delta) ** beta, where
    ``delta`` is 1e-6 of the priority range, so every candidate keeps a chance. ``beta = 0`` is
    uniform, a large ``beta`` approaches the base's greedy order (Kirsch et al. 2023)."""

    def __init__(self, *, base: StrategySpec = "entropy", beta: float = 1.0) -> None:
        super().__init__(base)
        self.beta = float(check_number(self.name, "beta", beta, minimum=0))

    def log_weight(self, priority: np.ndarray) -> np.ndarray:
        if self.beta == 0:
            return np.zeros(len(priority))
        low, high = float(priority.min()), float(priority.max())
        delta = 1e-6 * (high - low) if high > low else 1.0
        return self.beta * np.log(priority - low + delta)

    def describe(self) -> str:
        return f"power beta={self.beta:g}"


@register_strategy("softmax")
class SoftmaxSamplingStrategy(_SamplingStrategy):
    """Stochastic batch: P(i) proportional to exp(priority_i / temperature). Temperature is in the
    base's priority units (nats for entropy); small = near greedy, large = near uniform."""

    def __init__(self, *, base: StrategySpec = "entropy", temperature: float = 1.0) -> None:
        super().__init__(base)
        self.temperature = float(check_number(self.name, "temperature", temperature, minimum=0, exclusive=True))

    def log_weight(self, priority: np.ndarray) -> np.ndarray:
        return priority / self.temperature

    def describe(self) -> str:
        return f"softmax T={self.temperature:g}"
