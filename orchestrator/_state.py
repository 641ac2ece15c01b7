"""The experiment's state file: where the loop stands, written atomically after every phase."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_json

SCHEMA_VERSION = 1
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
"""The config the experiment was started with (``resume`` reuses it)."""
POOL_CLASSES_FILE = "pool_classes.json"
"""With hidden ground truth (benchmarks): how many pool images hold each class, and its pixels: what
random selection would take, against which each round's labeled set is compared."""
UNREADABLE_FILE = "unreadable.csv"
"""Train images left out because they do not decode (``data.skip_unreadable``): sample_id, image_path, error."""
PHASES = ("train", "score", "select", "label", "track")


@dataclass
class State:
    """``round`` is the round in progress (1-based); ``phase`` the last phase it completed ("" =
    none). ``revision`` is the table revision the round trains on until ``label`` replaces it.
    ``round_info`` holds the outputs of the completed phases of the round in progress."""

    experiment_uid: str
    revision: str
    round: int = 1
    phase: str = ""
    parent_run_id: str | None = None
    round_info: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    schema_version: int = SCHEMA_VERSION

    def next_phase(self) -> str | None:
        if self.stopped:
            return None
        i = PHASES.index(self.phase) + 1 if self.phase else 0
        return PHASES[i] if i < len(PHASES) else None

    def save(self, workdir: Path) -> None:
        atomic_write_json(workdir / STATE_FILE, asdict(self))

    @classmethod
    def load(cls, workdir: Path) -> State:
        path = workdir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no Shoal experiment in {workdir} ({STATE_FILE} not found)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{path} has state schema version {version!r}; this Shoal reads version "
                f"{SCHEMA_VERSION}. Use the Shoal version that wrote it, or start a new work dir."
            )
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path} has unknown fields {sorted(unknown)}")
        state = cls(**data)
        if state.phase and state.phase not in PHASES:
            raise ValueError(f"{path}: unknown phase {state.phase!r}")
        return state
