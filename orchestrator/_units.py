"""The acquisition unit of an experiment, chosen once from the config: the only code outside the
config that reads ``loop.unit``. See :class:`~orchestrator._context.AcquisitionUnit`."""

from __future__ import annotations

from strategies import build_strategy

from ._config import Config
from ._context import AcquisitionUnit
from ._image_unit import ImageUnit
from ._region_unit import RegionUnit

UNITS: dict[str, type[ImageUnit] | type[RegionUnit]] = {"image": ImageUnit, "region": RegionUnit}

__all__ = ["UNITS", "AcquisitionUnit", "ImageUnit", "RegionUnit", "build_seed_unit", "build_unit"]


def build_unit(config: Config) -> AcquisitionUnit:
    """The unit ``loop.unit`` names, with its strategy built from ``loop.strategy`` and its options
    (an unknown option is a ``ValueError`` naming it)."""
    return UNITS[config.loop.unit](config)


def build_seed_unit(config: Config) -> AcquisitionUnit:
    """The unit of round 0 (people label whole images before any model exists, whatever unit the
    rounds label by), with ``loop.initial_strategy``."""
    return ImageUnit(config, build_strategy(config.loop.initial_strategy))
