"""Class balance: pick the images that bring the labeled pixel counts closest to equal per class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _columns as col
from ._base import ID_COLUMN, Pool, Ranking, Strategy, check_number, register_strategy

MIN_BLOCK = 4096


@dataclass(frozen=True)
class BalancePicks:
    """picked: int64 [budget] positions; gain: float64 [budget] score when picked (-inf for rows
    without fractions, taken last); main_class / main_share: the class contributing most to each
    gain and its pixel share; labeled_before: that class's labeled pixels (image units) before the
    pick; final_score: float64 [n] every candidate's score after the last pick."""

    picked: np.ndarray
    gain: np.ndarray
    main_class: np.ndarray
    main_share: np.ndarray
    labeled_before: np.ndarray
    final_score: np.ndarray


def greedy_class_balance(fractions: np.ndarray, labeled: np.ndarray, eps: float, budget: int) -> BalancePicks:
    """Greedy: repeatedly pick the row maximising ``sum_c f_c / (labeled_c + eps)``, then add its
    fractions to ``labeled``.

    fractions: float64 [n, C] (any memory order), predicted pixel share per class; rows with a NaN
        are taken last. NaN rows are set to 0 IN PLACE (the caller passes a copy it owns: 1M x 11
        is 88 MB, not worth a second one).
    labeled: float64 [C], labeled pixels per class in image units (sum of shares).
    Exact (ties to the lowest position) but lazy: the weights only fall as ``labeled`` grows, so a
    score computed earlier bounds the current one from above. Each step rescores a block of the
    best-bounded rows (``O(block * C)``) and rescores all rows only when the block's best falls to
    the best bound outside it.
    """
    n, _ = fractions.shape
    valid = ~np.isnan(fractions).any(axis=1)
    f = fractions
    if not valid.all():
        f[~valid] = 0.0
    total = labeled.astype(np.float64).copy()
    alive = valid.copy()
    block_size = min(n, max(MIN_BLOCK, 16 * budget))

    picked: list[int] = []
    gain: list[float] = []
    main_class: list[int] = []
    main_share: list[float] = []
    labeled_before: list[float] = []

    # The block: positions ascending (so argmax breaks ties by position), with the best bound
    # outside it (theta) and the lowest position holding that bound (theta_pos).
    block = np.zeros(0, dtype=np.int64)
    block_f = np.zeros((0, f.shape[1]))
    theta, theta_pos = -np.inf, n
    fresh: np.ndarray | None = None

    def refresh() -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
        scores = f @ (1.0 / (total + eps))
        scores[~alive] = -np.inf
        n_alive = int(alive.sum())
        if n_alive <= block_size:
            rows = np.flatnonzero(alive)
            return rows, f[rows], scores[rows], -np.inf, n
        kth = -np.partition(-scores, block_size)[block_size]  # the (block_size+1)-th best
        above = np.flatnonzero(scores > kth)
        ties = np.flatnonzero(scores == kth)
        need = block_size - len(above)
        rows = np.sort(np.concatenate([above, ties[:need]]))
        return rows, f[rows], scores[rows], float(kth), int(ties[need])

    while len(picked) < budget and alive.any():
        if fresh is None:
            w = 1.0 / (total + eps)
            scores_b = block_f @ w
            scores_b[~alive[block]] = -np.inf
        else:
            scores_b = fresh
        j = int(np.argmax(scores_b)) if len(block) else -1
        if j >= 0 and np.isfinite(scores_b[j]):
            v, p = float(scores_b[j]), int(block[j])
            # Right after a refresh the block holds the exact best; later it must still beat theta.
            if fresh is not None or v > theta or (v == theta and p < theta_pos):
                w = 1.0 / (total + eps)
                contrib = f[p] * w
                c = int(np.argmax(contrib))
                picked.append(p)
                gain.append(v)
                main_class.append(c)
                main_share.append(float(f[p, c]))
                labeled_before.append(float(total[c]))
                total += f[p]
                alive[p] = False
                fresh = None
                continue
        block, block_f, fresh, theta, theta_pos = refresh()

    # Rows without fractions come last, in position order.
    short = budget - len(picked)
    if short > 0:
        taken = np.zeros(n, dtype=bool)
        taken[picked] = True
        rest = np.flatnonzero(~valid & ~taken)[:short]
        picked.extend(rest.tolist())
        gain.extend([-np.inf] * len(rest))
        main_class.extend([-1] * len(rest))
        main_share.extend([np.nan] * len(rest))
        labeled_before.extend([np.nan] * len(rest))
    final = f @ (1.0 / (total + eps))
    final[~valid] = -np.inf
    return BalancePicks(
        picked=np.asarray(picked, dtype=np.int64),
        gain=np.asarray(gain, dtype=np.float64),
        main_class=np.asarray(main_class, dtype=np.int64),
        main_share=np.asarray(main_share, dtype=np.float64),
        labeled_before=np.asarray(labeled_before, dtype=np.float64),
        final_score=final,
    )


@register_strategy("class_balance")
class ClassBalanceStrategy(Strategy):
    """Pick the images that most reduce class imbalance of the labeled pixels.

    Reads the predicted class shares ``pred_frac_<c>`` of the candidates and, for the labeled rows,
    their true shares ``label_frac_<c>`` when present (else ``pred_frac_<c>``), summed into labeled
    pixels per class in image units. Greedy: the next pick maximises ``sum_c pred_frac_c /
    (labeled_c + eps)``, then its shares count as labeled. Option ``eps`` (image units, > 0) keeps
    the weight of a class with no labeled pixel finite: ``1 / eps``.
    """

    column_prefixes = (col.CLASS_FRACTION_PREFIX,)
    optional_column_prefixes = (col.LABEL_FRACTION_PREFIX,)

    def __init__(self, *, eps: float = 1e-3) -> None:
        self.eps = float(check_number(self.name, "eps", eps, minimum=0, exclusive=True))

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        pred_cols = pool.prefixed_columns(col.CLASS_FRACTION_PREFIX)
        bad = [c for c in pred_cols if not c[len(col.CLASS_FRACTION_PREFIX):].isdigit()]
        if bad:
            raise ValueError(f"strategy '{self.name}': column {bad[0]!r} is not {col.CLASS_FRACTION_PREFIX}<class id>")
        classes = [int(c[len(col.CLASS_FRACTION_PREFIX):]) for c in pred_cols]
        fractions = pool.candidates[pred_cols].to_numpy(np.float64, copy=True)
        if np.isinf(fractions).any():
            sid = pool.candidates[ID_COLUMN].iloc[int(np.argmax(np.isinf(fractions).any(axis=1)))]
            raise ValueError(f"strategy '{self.name}': infinite class fraction for sample_id {sid!r}")
        negative = (fractions < 0).any(axis=1)
        if negative.any():
            sid = pool.candidates[ID_COLUMN].iloc[int(np.argmax(negative))]
            raise ValueError(f"strategy '{self.name}': negative class fraction for sample_id {sid!r}")
        picks = greedy_class_balance(fractions, self._labeled_pixels(pool, classes), self.eps, budget)

        priority = picks.final_score.copy()
        priority[picks.picked] = picks.gain
        at = {int(p): i for i, p in enumerate(picks.picked)}

        def explain(positions: np.ndarray, ranks: np.ndarray) -> list[str]:
            out = []
            for p in positions:
                i = at.get(int(p))
                if i is None:
                    out.append(f"class balance: score {priority[p]:.3g} after the picks")
                elif picks.main_class[i] < 0:
                    out.append("class balance: no predicted class fractions, taken last")
                else:
                    out.append(
                        f"class balance: gain {picks.gain[i]:.3g}, class {classes[picks.main_class[i]]} "
                        f"{picks.main_share[i]:.0%} of pixels (labeled so far {picks.labeled_before[i]:.3g} images)"
                    )
            return out

        return Ranking(priority=priority, head=picks.picked, key=picks.final_score, explain=explain)

    @staticmethod
    def _labeled_pixels(pool: Pool, classes: list[int]) -> np.ndarray:
        """float64 [C]: labeled pixels per class in image units (true shares where known)."""
        labeled = pool.labeled
        out = np.zeros(len(classes))
        if not len(labeled):
            return out
        for i, c in enumerate(classes):
            pred = labeled[col.class_fraction_column(c)].to_numpy(np.float64)
            true_col = col.label_fraction_column(c)
            if true_col in labeled.columns:
                true = labeled[true_col].to_numpy(np.float64)
                pred = np.where(np.isfinite(true), true, pred)
            out[i] = np.nansum(np.clip(pred, 0, None))
        return out
