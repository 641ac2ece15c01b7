"""Oracles: who labels the selected samples."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import pandas as pd

from ._table import MASK_PATH, SAMPLE_ID


class Oracle(ABC):
    interactive: ClassVar[bool] = False
    """True: people label; the loop exports a task folder and waits for ``import-labels``."""

    @abstractmethod
    def label(self, table: pd.DataFrame, sample_ids: list[str]) -> dict[str, str]:
        """Labels for ``sample_ids``: sample id -> path of its class-id mask PNG."""


class SimulatedOracle(Oracle):
    """Reveals the ground-truth masks the dataset already has (for benchmarks and the quickstart)."""

    def label(self, table: pd.DataFrame, sample_ids: list[str]) -> dict[str, str]:
        from workers import path_exists

        rows = table.set_index(SAMPLE_ID).loc[sample_ids, MASK_PATH]
        missing = [sid for sid, path in rows.items() if not isinstance(path, str) or not path_exists(path)]
        if missing:
            raise FileNotFoundError(
                f"the simulated oracle has no ground-truth mask for {len(missing)} selected samples, "
                f"e.g. {', '.join(map(str, missing[:5]))}"
            )
        return {str(k): str(v) for k, v in rows.items()}


class FolderOracle(Oracle):
    """People label a task folder of images (with pre-annotations) and return class-id PNGs."""

    interactive = True

    def label(self, table: pd.DataFrame, sample_ids: list[str]) -> dict[str, str]:
        raise RuntimeError("people label through the task folder: shoal import-labels WORKDIR SOURCE")


class LabelStudioOracle(FolderOracle):
    """Like the folder oracle, plus tasks.json with brush pre-annotations for Label Studio; its JSON
    export is read back into class-id masks."""


_ORACLES: dict[str, type[Oracle]] = {"simulated": SimulatedOracle, "folder": FolderOracle, "label-studio": LabelStudioOracle}


def build_oracle(kind: str) -> Oracle:
    if kind not in _ORACLES:
        raise ValueError(f"oracle.kind: unknown oracle '{kind}'; available: {', '.join(sorted(_ORACLES))}")
    return _ORACLES[kind]()
