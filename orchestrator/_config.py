"""Typed experiment configuration, loaded from YAML and validated where it is built.

Every section is a frozen dataclass. Unknown keys, wrong types and bad values raise ``ValueError``
naming the key path (``train.epochs``), so a misspelled key never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "shoal"
    seed: int = 0


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int = 192
    num_val: int = 48
    height: int = 96
    width: int = 128
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["synthetic", "folder"] = "synthetic"
    """``synthetic``: the built-in subsea generator, written once under the work dir.
    ``folder``: ``train_dir`` and ``val_dir`` each hold ``images/`` and ``masks/``."""
    train_dir: str | None = None
    val_dir: str | None = None
    image_size: tuple[int, int] = (96, 128)
    """(height, width) that images and masks are resized to inside the workers."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "unet"
    options: dict[str, Any] = field(default_factory=dict)
    """Passed to the model builder (``unet``: base_channels, depth, dropout; ``segformer``:
    pretrained, config)."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    samples_per_epoch: int | None = None
    """Samples drawn (by weight, with replacement) per epoch; None = the labeled count."""
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    num_workers: int = 1
    """Ray Train workers (DDP ranks). 0 runs the training function in the driver process."""
    use_gpu: bool = False
    cpus_per_worker: int = 1


@dataclass(frozen=True)
class ScoreConfig:
    num_actors: int = 1
    batch_size: int = 16
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass(frozen=True)
class LoopConfig:
    strategy: str = "entropy"
    initial_labeled: int = 16
    """Samples labeled at random before the first round."""
    budget: int = 16
    """Samples labeled per round."""
    rounds: int = 3
    """Rounds to run; each trains, scores the pool, selects ``budget`` samples and labels them."""


@dataclass(frozen=True)
class OracleConfig:
    kind: Literal["simulated"] = "simulated"


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None
    """None = a SQLite store in the work dir (``<workdir>/mlflow.db``)."""
    experiment_name: str | None = None
    """None = ``experiment.name``."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """None = the cluster in ``RAY_ADDRESS`` when set (``ray job submit``), else a new local one."""
    num_cpus: int | None = None
    """CPUs of a new local cluster (None = all)."""


@dataclass(frozen=True)
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """``{"train.epochs": 8, ...}``: the config as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix != "model.options":
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


_POSITIVE = {
    "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.height",
    "data.synthetic.width", "train.epochs", "train.batch_size", "train.cpus_per_worker",
    "score.num_actors", "score.batch_size", "loop.initial_labeled", "loop.budget", "loop.rounds",
}
_NON_NEGATIVE = {"train.num_workers", "train.lr", "train.weight_decay", "score.gpus_per_actor"}


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: {value!r} is not {tp}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(map(repr, typing.get_args(tp)))
            raise ValueError(f"{path}: {value!r} is not one of {allowed}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(args):
            raise ValueError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def _build(cls: Any, data: Mapping[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ValueError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, hints[key], sub)
        if sub in _POSITIVE and kwargs[key] <= 0:
            raise ValueError(f"{sub}: must be positive, got {value!r}")
        if sub in _NON_NEGATIVE and kwargs[key] < 0:
            raise ValueError(f"{sub}: must not be negative, got {value!r}")
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    if cfg.data.kind == "folder":
        for key in ("train_dir", "val_dir"):
            if getattr(cfg.data, key) is None:
                raise ValueError(f"data.{key}: required when data.kind is 'folder'")
    if any(v <= 0 for v in cfg.data.image_size):
        raise ValueError(f"data.image_size: must be two positive integers, got {cfg.data.image_size}")
    if cfg.train.samples_per_epoch is not None and cfg.train.samples_per_epoch <= 0:
        raise ValueError("train.samples_per_epoch: must be positive or null")
    from strategies import strategy_names

    if cfg.loop.strategy not in strategy_names():
        raise ValueError(
            f"loop.strategy: unknown strategy '{cfg.loop.strategy}'; "
            f"registered: {', '.join(strategy_names())}"
        )


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from a mapping plus ``KEY=VALUE`` overrides (values parsed as YAML)."""
    merged: dict[str, Any] = _to_plain(dict(data))
    for item in overrides:
        keys, value = _parse_override(item)
        node = merged
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    cfg = _build(Config, merged)
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``configs/*.yaml`` (``yaml.safe_load``) and apply ``KEY=VALUE`` overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(data, overrides)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
