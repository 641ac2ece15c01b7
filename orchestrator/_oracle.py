"""Oracles: who labels the selected samples."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import pandas as pd

from ._table import MASK_PATH, SAMPLE_ID


class Oracle(ABC):
    @abstractmethod
    def label(self, table: pd.DataFrame, sample_ids: list[str]) -> dict[str, str]:
        """Labels for ``sample_ids``: sample id -> path of its class-id mask PNG."""


class SimulatedOracle(Oracle):
    """Reveals the ground-truth masks the dataset already has (for benchmarks and the quickstart)."""

    def label(self, table: pd.DataFrame, sample_ids: list[str]) -> dict[str, str]:
        rows = table.set_index(SAMPLE_ID).loc[sample_ids, MASK_PATH]
        missing = [sid for sid, path in rows.items() if not isinstance(path, str) or not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the simulated oracle has no ground-truth mask for {len(missing)} selected samples, "
                f"e.g. {', '.join(map(str, missing[:5]))}"
            )
        return {str(k): str(v) for k, v in rows.items()}


_ORACLES = {"simulated": SimulatedOracle}


def build_oracle(kind: str) -> Oracle:
    if kind not in _ORACLES:
        raise ValueError(f"oracle.kind: unknown oracle '{kind}'; available: {', '.join(sorted(_ORACLES))}")
    return _ORACLES[kind]()
