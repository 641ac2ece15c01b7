"""The orchestrator: config, experiment state, the active-learning loop, its CLI and API."""

from ._config import Config, config_from_dict, load_config
from ._loop import ActiveLearningLoop, RoundResult
from ._state import State
from ._table import RevisionInfo, TableStore

__all__ = [
    "ActiveLearningLoop",
    "Config",
    "RevisionInfo",
    "RoundResult",
    "State",
    "TableStore",
    "config_from_dict",
    "load_config",
]
