"""Selection strategies: pure functions of a per-sample score table (no torch, no Ray, no I/O).

Also the training weight policies (``compute_weights``, ``manual_override``) and the stopping
criteria (``stopping_rule``), pure functions of the table and the round history.
"""

from . import _columns as columns
from . import _region_columns as region_columns
from ._balance import ClassBalanceStrategy
from ._base import (
    Pool,
    Ranking,
    Requirements,
    ScoreStrategy,
    Strategy,
    StrategySpec,
    build_strategy,
    register_strategy,
    strategy_class,
    strategy_names,
    strategy_options,
)
from ._compose import FusionStrategy, PowerSamplingStrategy, SoftmaxSamplingStrategy
from ._cost import AnnotationCost, CostModel, mask_annotation_cost, polygon_vertices, region_clicks
from ._diversity import ClusterUncertaintyStrategy, ColdStartStrategy, CoreSetStrategy
from ._regions import (
    RegionStrategy,
    build_region_strategy,
    region_strategy_class,
    region_strategy_names,
    region_strategy_options,
    register_region_strategy,
)
from ._registry import Registry
from ._reweight import (
    compute_weights,
    manual_override,
    register_reweighting,
    reweighting_names,
    reweighting_options,
)
from ._sam import SamDisagreementStrategy
from ._stopping import (
    Criterion,
    StopDecision,
    any_of,
    budget_spent,
    low_uncertainty,
    miou_plateau,
    pool_exhausted,
    stopping_rule,
)
from ._uncertainty import (
    BaldStrategy,
    EntropyStrategy,
    LeastConfidenceStrategy,
    MarginStrategy,
    RandomStrategy,
)

__all__ = [
    "BaldStrategy",
    "ClassBalanceStrategy",
    "ClusterUncertaintyStrategy",
    "ColdStartStrategy",
    "CoreSetStrategy",
    "Criterion",
    "EntropyStrategy",
    "FusionStrategy",
    "LeastConfidenceStrategy",
    "MarginStrategy",
    "Pool",
    "PowerSamplingStrategy",
    "RandomStrategy",
    "Ranking",
    "Registry",
    "Requirements",
    "SamDisagreementStrategy",
    "ScoreStrategy",
    "SoftmaxSamplingStrategy",
    "StopDecision",
    "Strategy",
    "StrategySpec",
    "any_of",
    "budget_spent",
    "build_strategy",
    "columns",
    "compute_weights",
    "low_uncertainty",
    "manual_override",
    "miou_plateau",
    "pool_exhausted",
    "register_reweighting",
    "register_strategy",
    "reweighting_names",
    "reweighting_options",
    "stopping_rule",
    "strategy_class",
    "strategy_names",
    "strategy_options",
    # regions: click costs and region selection under a click budget
    "AnnotationCost",
    "CostModel",
    "RegionStrategy",
    "build_region_strategy",
    "mask_annotation_cost",
    "polygon_vertices",
    "region_clicks",
    "region_columns",
    "region_strategy_class",
    "region_strategy_names",
    "region_strategy_options",
    "register_region_strategy",
]
