"""Stopping criteria: pure functions of the round history.

The history is one mapping per finished round, oldest first, with ``labeled_count`` (labeled
samples after the round), ``val_miou`` (None or NaN when not measured), ``pool_uncertainty_mean``
(mean uncertainty of the unlabeled pool, None when not scored) and ``pool_size`` (unlabeled samples
left). A criterion maps the history to a :class:`StopDecision`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

History = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str


Criterion = Callable[[History], StopDecision]


def _value(history: History, index: int, key: str) -> float | None:
    round_info = history[index]
    if key not in round_info:
        raise ValueError(f"round history entry {index % len(history)} lacks '{key}'")
    value = round_info[key]
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def budget_spent(total_budget: int) -> Criterion:
    """Stop once ``labeled_count`` reaches ``total_budget`` samples."""
    if isinstance(total_budget, bool) or not isinstance(total_budget, int) or total_budget <= 0:
        raise ValueError(f"total_budget must be a positive number of samples, got {total_budget!r}")

    def check(history: History) -> StopDecision:
        labeled = _value(history, -1, "labeled_count") if history else None
        if labeled is not None and labeled >= total_budget:
            return StopDecision(True, f"labeling budget spent: {labeled:.0f} labeled >= total_budget {total_budget}")
        return StopDecision(False, f"{labeled or 0:.0f} of {total_budget} samples labeled")

    return check


def pool_exhausted() -> Criterion:
    """Stop when no unlabeled sample is left."""

    def check(history: History) -> StopDecision:
        size = _value(history, -1, "pool_size") if history else None
        if size is not None and size <= 0:
            return StopDecision(True, "pool exhausted: no unlabeled sample left")
        return StopDecision(False, f"{size or 0:.0f} unlabeled samples left" if history else "no round yet")

    return check


def miou_plateau(rounds: int, min_delta: float) -> Criterion:
    """Stop when the best val mIoU of the last ``rounds`` rounds improves on the best before them by
    less than ``min_delta`` (mIoU units, e.g. 0.005). Rounds without a val mIoU are skipped."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"plateau rounds must be an integer >= 1, got {rounds!r}")
    if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
        raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")

    def check(history: History) -> StopDecision:
        values = [v for i in range(len(history)) if (v := _value(history, i, "val_miou")) is not None]
        if len(values) <= rounds:
            return StopDecision(False, f"val mIoU: {len(values)} rounds measured, plateau needs {rounds + 1}")
        before, recent = max(values[:-rounds]), max(values[-rounds:])
        gain = recent - before
        if gain < min_delta:
            return StopDecision(
                True,
                f"val mIoU plateau: best {recent:.4f} in the last {rounds} rounds vs {before:.4f} before "
                f"(gain {gain:+.4f} < min_delta {min_delta})",
            )
        return StopDecision(False, f"val mIoU still improving: gain {gain:+.4f} over the last {rounds} rounds")

    return check


def low_uncertainty(threshold: float) -> Criterion:
    """Stop when the mean uncertainty of the unlabeled pool falls below ``threshold``."""
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"uncertainty threshold must be a finite number, got {threshold!r}")

    def check(history: History) -> StopDecision:
        value = _value(history, -1, "pool_uncertainty_mean") if history else None
        if value is not None and value < threshold:
            return StopDecision(True, f"pool uncertainty {value:.4g} < threshold {threshold:g}")
        shown = "unknown" if value is None else f"{value:.4g}"
        return StopDecision(False, f"pool uncertainty {shown} (threshold {threshold:g})")

    return check


def any_of(*criteria: Criterion) -> Criterion:
    """Stop when any criterion says so; the reason lists every criterion that fired."""

    def check(history: History) -> StopDecision:
        decisions = [c(history) for c in criteria]
        fired = [d.reason for d in decisions if d.stop]
        if fired:
            return StopDecision(True, "; ".join(fired))
        return StopDecision(False, "; ".join(d.reason for d in decisions) or "no stopping criterion")

    return check


def stopping_rule(
    *,
    total_budget: int | None = None,
    plateau_rounds: int | None = None,
    min_delta: float = 0.0,
    uncertainty_threshold: float | None = None,
) -> Criterion:
    """The criteria a config asks for, combined by :func:`any_of`; None turns one off. The pool
    running out always stops."""
    criteria = [pool_exhausted()]
    if total_budget is not None:
        criteria.append(budget_spent(total_budget))
    if plateau_rounds is not None:
        criteria.append(miou_plateau(plateau_rounds, min_delta))
    if uncertainty_threshold is not None:
        criteria.append(low_uncertainty(uncertainty_threshold))
    return any_of(*criteria)
