"""One strict registry helper behind every kind of plugin looked up by name: image and region
strategies, reweighting policies, segmentation models and SAM architectures."""

from __future__ import annotations

import pytest

import strategies
from strategies import Registry, _base, _regions, _reweight
from workers import _models, _sam

REGISTRIES = {
    "strategy": _base.REGISTRY,
    "region strategy": _regions.REGISTRY,
    "reweighting policy": _reweight.REGISTRY,
    "model": _models.REGISTRY,
    "SAM model type": _sam.REGISTRY,
}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_kind_uses_the_one_helper(kind: str) -> None:
    registry = REGISTRIES[kind]
    assert isinstance(registry, Registry) and registry.kind == kind and len(registry) > 0
    with pytest.raises(ValueError, match=rf"^unknown {kind} 'nope'; registered: {', '.join(registry.names())}$"):
        registry.get("nope")
    first = registry.names()[0]
    with pytest.raises(ValueError, match=rf"^{kind} '{first}' is already registered$"):
        registry.copy().add(first, registry.get(first))
    assert registry.names() == sorted(registry)


def test_a_plugin_options_are_keyword_only_with_defaults() -> None:
    reg: Registry = Registry("widget", positional=1)

    @reg.register("good")
    def good(size: int, *, colour: str = "red", depth: int = 2) -> tuple:
        return size, colour, depth

    assert reg.options("good") == {"colour": "red", "depth": 2}
    assert reg.build("good", 3, depth=4) == (3, "red", 4)
    with pytest.raises(ValueError, match="^widget 'good' has no option 'color'; valid options: colour, depth$"):
        reg.build("good", 3, color="blue")
    with pytest.raises(ValueError, match="offending parameters: colour"):
        reg.add("positional", lambda size, colour="red": None)
    with pytest.raises(ValueError, match="offending parameters: depth"):
        reg.add("no_default", lambda size, *, depth: None)
    assert reg.names() == ["good"]  # refused plugins are not registered


def test_image_and_region_strategies_share_one_namespace() -> None:
    image, region = _base.REGISTRY.copy(), _regions.REGISTRY.copy()
    with pytest.raises(ValueError, match="already registered"):
        region.add("entropy", _regions.RegionRandomStrategy)
    with pytest.raises(ValueError, match="already registered"):
        image.add("region_random", strategies.RandomStrategy)
    assert set(strategies.strategy_names()).isdisjoint(strategies.region_strategy_names())
