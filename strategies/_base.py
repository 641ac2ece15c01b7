"""The strategy contract: a pure function from a per-sample score table and a budget to ids.

A strategy declares what it reads (:class:`Requirements`), turns the unlabeled rows of the table into
a :class:`Ranking` (one method to write) and the base class does the rest: checks, ordering rows by
``sample_id`` so the result does not depend on row order, NaN handling and reasons.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd

from ._registry import Registry

ID_COLUMN = "sample_id"
LABELED_COLUMN = "labeled"

Explain = Callable[[np.ndarray, np.ndarray], list[str]]
"""``explain(positions, ranks) -> reasons``: one short string per candidate position, ``ranks`` being
their 1-based ranks in the ranking that owns the function."""


@dataclass(frozen=True)
class Requirements:
    """Everything a (possibly composite) strategy needs before it can select.

    columns: score columns that must exist (``strategies.columns``).
    column_prefixes: column families of which at least one column must exist (``pred_frac_``).
    optional_column_prefixes: families read when present (``label_frac_``, ``feat_``); the loop
        should provide them when it can, their absence is not an error.
    embeddings: whether ``select`` needs an embedding matrix ``[N, D]`` aligned with the table rows.
    mc_dropout_passes: stochastic forward passes the scorer must run to write ``bald_mean``; 0 = none.
    """

    columns: frozenset[str] = frozenset()
    column_prefixes: frozenset[str] = frozenset()
    optional_column_prefixes: frozenset[str] = frozenset()
    embeddings: bool = False
    mc_dropout_passes: int = 0

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(
            columns=self.columns | other.columns,
            column_prefixes=self.column_prefixes | other.column_prefixes,
            optional_column_prefixes=self.optional_column_prefixes | other.optional_column_prefixes,
            embeddings=self.embeddings or other.embeddings,
            mc_dropout_passes=max(self.mc_dropout_passes, other.mc_dropout_passes),
        )


@dataclass(frozen=True)
class Pool:
    """One selection problem, every frame with a 0..n-1 index.

    candidates: the unlabeled rows (the only selectable ones) in a seeded random order fixed by the
        table's content and the generator's seed (ties among them fall to it); a "position" is a
        row number here.
    labeled: the labeled rows, context for diversity and class balance (may be empty).
    candidate_embeddings / labeled_embeddings: float32 ``[n, D]`` / ``[m, D]`` rows aligned with the
        frames, or None when the strategy declares no embeddings.
    """

    candidates: pd.DataFrame
    labeled: pd.DataFrame
    candidate_embeddings: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.candidates)

    def prefixed_columns(self, prefix: str) -> list[str]:
        """Columns of the table named ``<prefix><suffix>``, sorted by suffix (numerically if int)."""
        names = [str(c) for c in self.candidates.columns if str(c).startswith(prefix)]

        def key(name: str) -> tuple[int, int, str]:
            suffix = name[len(prefix):]
            return (0, int(suffix), "") if suffix.isdigit() else (1, 0, suffix)

        return sorted(names, key=key)


@dataclass(frozen=True)
class Ranking:
    """A strategy's ordering of the candidates of a :class:`Pool`.

    priority: float64 [n], the strategy's score per candidate (higher = wanted more; no NaN, -inf for
        "cannot score"): what wrappers such as ``power`` sample from and what reasons show.
    head: int64 [k], k >= budget, candidate positions ranked first, in order (the selection).
    key: float64 [n] or None; the candidates not in ``head`` follow by descending ``key`` (default
        ``priority``), ties by position, i.e. by ``sample_id``.
    explain: reasons for candidate positions, or None for a generic "<name> priority <p>".
    """

    priority: np.ndarray
    head: np.ndarray
    key: np.ndarray | None = None
    explain: Explain | None = None
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def full_order(self) -> np.ndarray:
        """int64 [n]: every candidate position, best first (``head`` then the rest by ``key``)."""
        if "order" not in self._cache:
            key = self.priority if self.key is None else self.key
            rest = np.ones(len(key), dtype=bool)
            rest[self.head] = False
            others = np.flatnonzero(rest)
            others = others[descending_order(key[others])]
            self._cache["order"] = np.concatenate([self.head, others]).astype(np.int64)
        return self._cache["order"]

    def ranks(self) -> np.ndarray:
        """int64 [n]: the 0-based rank of every candidate position."""
        if "ranks" not in self._cache:
            order = self.full_order()
            ranks = np.empty(len(order), dtype=np.int64)
            ranks[order] = np.arange(len(order))
            self._cache["ranks"] = ranks
        return self._cache["ranks"]

    def rank_of(self, positions: np.ndarray) -> np.ndarray:
        """0-based ranks of ``positions``, without a full sort when they all lie in ``head``."""
        positions = np.asarray(positions, dtype=np.int64)
        where = {int(p): i for i, p in enumerate(self.head)}
        if all(int(p) in where for p in positions):
            return np.array([where[int(p)] for p in positions], dtype=np.int64)
        return self.ranks()[positions]

    def reasons(self, positions: np.ndarray, name: str) -> list[str]:
        ranks = self.rank_of(positions) + 1
        if self.explain is not None:
            return self.explain(positions, ranks)
        return [f"{name} priority {self.priority[p]:.3g} (rank {r})" for p, r in zip(positions, ranks)]


def as_priority(values: Any, n: int, who: str) -> np.ndarray:
    """float64 [n] with NaN mapped to -inf (an image the scorer could not score goes last)."""
    priority = np.asarray(values, dtype=np.float64)
    if priority.shape != (n,):
        raise AssertionError(f"{who}: priority shape {priority.shape} != ({n},)")
    return np.where(np.isnan(priority), -np.inf, priority)


def tie_order(rng: np.random.Generator) -> np.random.Generator:
    """A generator for the order ties fall in, derived from ``rng`` without drawing from it (so a
    strategy's own draws are those it would make anyway): the same for the same seed."""
    return rng.spawn(1)[0]


def descending_order(key: np.ndarray) -> np.ndarray:
    """int64 [n]: positions by descending ``key``, ties by position.

    Equals ``np.argsort(-key, kind="stable")``, about 3x faster on 1M floats: an unstable sort,
    then, only if equal keys exist, a sort of the unique integers ``tie_run * n + position``.
    """
    order = np.argsort(-key)
    ordered = key[order]
    ties = ordered[1:] == ordered[:-1]
    if ties.any():
        run = np.concatenate([[0], np.cumsum(~ties)])
        order = order[np.argsort(run * len(key) + order)]
    return order.astype(np.int64, copy=False)


def top_order(key: np.ndarray, k: int) -> np.ndarray:
    """int64 [k]: positions of the ``k`` largest ``key`` values, descending, ties by position.

    Equals ``np.argsort(-key, kind="stable")[:k]`` without sorting all of ``key``.
    """
    n = len(key)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k * 4 >= n:
        return descending_order(key)[:k]
    kth = -np.partition(-key, k - 1)[k - 1]  # the k-th largest value
    above = np.flatnonzero(key > kth)
    ties = np.flatnonzero(key == kth)[: k - len(above)]
    chosen = np.concatenate([above, ties])
    return chosen[np.lexsort((chosen, -key[chosen]))].astype(np.int64)


class Strategy(ABC):
    """Selects the next samples to label from a table of per-sample scores.

    A subclass declares what it reads (class attributes below, or per instance when they depend on
    options) and writes one method, :meth:`rank`; most subclass :class:`ScoreStrategy` and write
    :meth:`ScoreStrategy.priority` instead. Wrappers list the strategies they wrap in ``members`` so
    :meth:`requirements` covers them. Strategies do no I/O and import neither torch nor Ray.
    """

    name: ClassVar[str] = ""
    required_columns: tuple[str, ...] = ()
    """Score columns the scorer must produce for this strategy (see ``strategies.columns``)."""
    column_prefixes: tuple[str, ...] = ()
    """Column families of which at least one column must exist (``pred_frac_``)."""
    optional_column_prefixes: tuple[str, ...] = ()
    """Column families read when present."""
    needs_embeddings: bool = False
    """Whether ``select`` needs ``embeddings``: float32 [N, D] aligned with the table rows."""
    mc_dropout_passes: int = 0
    """MC-dropout forward passes the scorer must run (it then writes ``bald_mean``); 0 = none."""
    members: tuple[Strategy, ...] = ()
    """Strategies this one wraps; their requirements are part of this one's."""

    def requirements(self) -> Requirements:
        """Everything this strategy and the strategies it wraps need (what the loop must provide)."""
        own = Requirements(
            columns=frozenset(self.required_columns),
            column_prefixes=frozenset(self.column_prefixes),
            optional_column_prefixes=frozenset(self.optional_column_prefixes),
            embeddings=self.needs_embeddings,
            mc_dropout_passes=self.mc_dropout_passes,
        )
        for member in self.members:
            own = own | member.requirements()
        return own

    def select(
        self,
        table: pd.DataFrame,
        budget: int,
        rng: np.random.Generator,
        embeddings: np.ndarray | None = None,
    ) -> list[str]:
        """Return exactly ``budget`` distinct unlabeled sample ids, highest priority first.

        ``table`` has one row per sample with a ``sample_id`` column, the declared score columns and
        optionally a boolean ``labeled`` column (labeled rows are never selected; diversity and class
        balance use them as context). ``embeddings`` (float [N, D], row i = ``table.iloc[i]``) is
        required when :meth:`requirements` says so. The result depends only on the table's content
        (not its row order), the budget and the state of ``rng``.
        Raises ``ValueError`` when the budget is not a positive integer or exceeds the candidates, or
        when a declared column or the embeddings are missing.
        """
        pool, ranking, head = self._run(table, budget, rng, embeddings)
        return [str(s) for s in pool.candidates[ID_COLUMN].iloc[head].tolist()]

    def select_with_reasons(
        self,
        table: pd.DataFrame,
        budget: int,
        rng: np.random.Generator,
        embeddings: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """Like :meth:`select`, as a frame ``[sample_id, rank, priority, reason]`` in selection order.

        ``rank`` starts at 1; ``priority`` is the strategy's score; ``reason`` a short string such as
        ``"entropy_mean 0.83 (rank 1)"`` or ``"core-set: farthest, distance 3.2"``. Draws from ``rng``
        exactly as :meth:`select` does, so both give the same ids for the same generator state.
        """
        pool, ranking, head = self._run(table, budget, rng, embeddings)
        return pd.DataFrame({
            ID_COLUMN: [str(s) for s in pool.candidates[ID_COLUMN].iloc[head].tolist()],
            "rank": np.arange(1, len(head) + 1),
            "priority": ranking.priority[head],
            "reason": ranking.reasons(head, self.name),
        })

    @abstractmethod
    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        """Order the candidates of ``pool``; ``head`` must hold at least ``budget`` positions."""

    # -- shared work -------------------------------------------------------------------------------

    def _run(
        self, table: pd.DataFrame, budget: int, rng: np.random.Generator, embeddings: np.ndarray | None
    ) -> tuple[Pool, Ranking, np.ndarray]:
        pool = self._pool(table, budget, embeddings, tie_order(rng))
        ranking = self.rank(pool, budget, rng)
        head = np.asarray(ranking.head[:budget], dtype=np.int64)
        if len(head) != budget or len(np.unique(head)) != budget:
            raise AssertionError(f"{self.name}: ranking head {head} is not {budget} distinct positions")
        return pool, ranking, head

    def _pool(self, table: pd.DataFrame, budget: int, embeddings: np.ndarray | None,
              shuffle: np.random.Generator | None = None) -> Pool:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
            raise ValueError(f"budget must be a positive number of samples, got {budget!r}")
        req = self.requirements()
        names = [str(c) for c in table.columns]
        missing = [c for c in (ID_COLUMN, *sorted(req.columns)) if c not in names]
        missing += [f"{p}*" for p in sorted(req.column_prefixes) if not any(c.startswith(p) for c in names)]
        if missing:
            raise ValueError(
                f"strategy '{self.name}' needs score columns {missing}; the table has {sorted(names)}"
            )
        ids = table[ID_COLUMN]
        if ids.isna().any():
            raise ValueError(f"the score table has rows without a sample_id: {int(ids.isna().sum())}")
        # Rows in sample_id order: ties and random draws then map to the same samples however the
        # caller ordered the table. Tables usually arrive sorted; one vectorised comparison of
        # neighbours proves that and the absence of duplicates at once.
        perm = None
        if not np.asarray(ids.array[1:] > ids.array[:-1], dtype=bool).all():
            perm = ids.argsort(kind="stable").to_numpy()
            sorted_ids = ids.array.take(perm)
            same = np.asarray(sorted_ids[1:] == sorted_ids[:-1], dtype=bool)
            if same.any():
                raise ValueError(f"duplicate sample_id {sorted_ids[int(np.argmax(same))]!r} in the score table")

        # Only what the strategy declared reaches it: an undeclared read fails in tests, not in a run.
        prefixes = tuple(req.column_prefixes | req.optional_column_prefixes)
        wanted = {ID_COLUMN, LABELED_COLUMN, *req.columns}
        keep = [i for i, c in enumerate(names) if c in wanted or (prefixes and c.startswith(prefixes))]
        frame = table if len(keep) == len(names) else table.iloc[:, keep]
        self._check_finite(frame)
        if LABELED_COLUMN in names:
            flags = frame[LABELED_COLUMN]
            labeled = flags.to_numpy(dtype=bool) if flags.dtype == bool else flags.to_numpy(dtype=bool, na_value=False)
        else:
            labeled = np.zeros(len(frame), dtype=bool)
        n_candidates = len(frame) - int(labeled.sum())
        if budget > n_candidates:
            raise ValueError(f"budget of {budget} samples exceeds the {n_candidates} unlabeled samples left")
        # Row numbers of the candidates and the labeled rows, each in sample_id order; then the
        # candidates in a seeded random order (``shuffle``), so that ties (an untrained model, equal
        # scores) fall to a neutral draw, not to the ids first in the alphabet (the oldest survey,
        # the first camera). Both orders are fixed by the content, so the result is too.
        order = np.arange(len(frame)) if perm is None else perm
        in_order = labeled[order]
        cand_rows, lab_rows = order[~in_order], order[in_order]
        if shuffle is not None and len(cand_rows) > 1:
            cand_rows = cand_rows[shuffle.permutation(len(cand_rows))]
            perm = cand_rows  # no longer the table's own order
        if perm is None and n_candidates == len(frame):
            candidates = frame.reset_index(drop=True)
        else:
            candidates = frame.take(cand_rows).reset_index(drop=True)
        labeled_rows = frame.take(lab_rows).reset_index(drop=True) if len(lab_rows) else frame.iloc[:0]

        cand_emb = lab_emb = None
        if req.embeddings:
            matrix = self._embeddings(embeddings, table)
            cand_emb, lab_emb = matrix[cand_rows], matrix[lab_rows]
        return Pool(candidates, labeled_rows, cand_emb, lab_emb)

    @staticmethod
    def _check_finite(frame: pd.DataFrame) -> None:
        """An infinite score is a bug upstream, not a very uncertain image: refuse it, naming the
        column and the sample (NaN means "not scored" and ranks last)."""
        for name in frame.columns:
            if name in (ID_COLUMN, LABELED_COLUMN) or not pd.api.types.is_float_dtype(frame[name].dtype):
                continue
            values = frame[name].to_numpy(dtype=np.float64)
            bad = np.isinf(values)
            if bad.any():
                sid = frame[ID_COLUMN].iloc[int(np.argmax(bad))]
                raise ValueError(f"score column '{name}' of sample_id {sid!r} is {values[bad][0]}: scores must be finite or NaN")

    def _embeddings(self, embeddings: np.ndarray | None, table: pd.DataFrame) -> np.ndarray:
        if embeddings is None:
            raise ValueError(
                f"strategy '{self.name}' needs embeddings: pass select(..., embeddings=E) with E a float "
                f"array [N, D] whose row i belongs to table row i (N = {len(table)})"
            )
        matrix = np.asarray(embeddings)
        if matrix.ndim != 2 or matrix.shape[0] != len(table) or matrix.shape[1] == 0:
            raise ValueError(
                f"strategy '{self.name}': embeddings must be [N, D] with N = {len(table)} table rows, "
                f"got shape {matrix.shape}"
            )
        matrix = matrix.astype(np.float32, copy=False)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            bad = table[ID_COLUMN].iloc[int(np.argmin(finite))]
            raise ValueError(f"strategy '{self.name}': the embedding of sample_id {bad!r} is not finite")
        return matrix


class ScoreStrategy(Strategy):
    """A strategy that scores every candidate on its own: write :meth:`priority`."""

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        candidates = pool.candidates
        priority = as_priority(self.priority(candidates, rng), len(candidates), self.name)

        def explain(positions: np.ndarray, ranks: np.ndarray) -> list[str]:
            return self.explain(candidates, priority, positions, ranks)

        return Ranking(priority=priority, head=top_order(priority, budget), explain=explain)

    @abstractmethod
    def priority(self, candidates: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        """Per-candidate priority, float64 [len(candidates)]: higher is selected first, NaN last."""

    def explain(
        self, candidates: pd.DataFrame, priority: np.ndarray, positions: np.ndarray, ranks: np.ndarray
    ) -> list[str]:
        """Reasons for ``positions`` (1-based ``ranks``); override to show the column read."""
        return [f"{self.name} {priority[p]:.3g} (rank {r})" for p, r in zip(positions, ranks)]


# -- registry ----------------------------------------------------------------------------------------

REGISTRY: Registry[type[Strategy]] = Registry("strategy")
S = TypeVar("S", bound=type[Strategy])

StrategySpec = str | Mapping[str, Any] | Strategy
"""A strategy given as a name (``"entropy"``), a mapping with ``name`` and options
(``{"name": "entropy", "aggregation": "topk"}``) or an instance."""


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator adding a strategy to the registry under ``name`` (unique).

    The options of the strategy are the keyword-only parameters of its ``__init__``, all with
    defaults, so ``build_strategy(name)`` always works.
    """

    def add(cls: S) -> S:
        REGISTRY.register(name)(cls)
        cls.name = name
        return cls

    return add


def strategy_names() -> list[str]:
    return REGISTRY.names()


def strategy_class(name: str) -> type[Strategy]:
    return REGISTRY.get(name)


def strategy_options(name: str) -> dict[str, Any]:
    """The options of strategy ``name`` with their defaults."""
    return REGISTRY.options(name)


def build_strategy(name: str, **options: Any) -> Strategy:
    """An instance of the registered strategy ``name`` with ``options``.

    An unknown name lists the registered ones; an unknown option names the strategy and the option
    and lists the valid options.
    """
    strategy: Strategy = REGISTRY.build(name, **options)
    return strategy


def build_member(spec: StrategySpec, owner: str, option: str) -> Strategy:
    """A strategy wrapped by ``owner`` from the spec given to its ``option`` (see StrategySpec)."""
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        return build_strategy(spec)
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"strategy '{owner}': option '{option}' needs a 'name' key, got {dict(spec)!r}")
        return build_strategy(name, **options)
    raise ValueError(
        f"strategy '{owner}': option '{option}' must be a strategy name, a mapping with 'name' and "
        f"options, or a Strategy; got {spec!r}"
    )


def check_number(owner: str, option: str, value: Any, *, minimum: float | None = None,
                 exclusive: bool = False, integer: bool = False) -> float:
    """``value`` as a float, checked to be a finite number (an integer when ``integer``) and against
    ``minimum``; otherwise a ValueError naming the strategy and the option."""
    ok_type = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not np.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"strategy '{owner}': option '{option}' must be {kind}, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        raise ValueError(f"strategy '{owner}': option '{option}' must be {bound}, got {value!r}")
    return float(value)
