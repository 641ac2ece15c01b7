"""One strict registry of named plugins, used by every kind Shoal looks up by name: image and region
strategies, reweighting policies (here), segmentation models and SAM architectures (``workers``).

A plugin is a class or a function; its options are its keyword-only parameters (of ``__init__`` for
a class), each with a default, so ``registry.build(name)`` always works. A name registered twice
raises; an unknown name or option raises and lists the valid ones:
``ValueError("unknown strategy 'entopy'; registered: entropy, margin, random")``.

No third-party import: ``strategies`` stays free of torch and Ray.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Plugins of one ``kind`` by name.

    ``positional``: leading positional parameters every plugin takes before its options (a model
    builder's ``num_classes``); ``exclusive_with``: registries sharing one namespace with this one
    (a config names an image or a region strategy by name alone), so a name taken there is taken here.
    """

    def __init__(self, kind: str, *, positional: int = 0, exclusive_with: Iterable[Registry[Any]] = ()) -> None:
        self.kind = kind
        self.positional = positional
        self._exclusive = list(exclusive_with)
        self._items: dict[str, T] = {}

    def share_namespace(self, other: Registry[Any]) -> None:
        """From now on a name registered in either of the two is taken in both."""
        for name in set(self._items) & set(other._items):
            raise ValueError(f"{self.kind} '{name}' is registered as a {other.kind} too")
        self._exclusive.append(other)
        other._exclusive.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding a plugin under ``name``; checks its signature (options with defaults)."""

        def add(plugin: T) -> T:
            if name in self._items or any(name in other for other in self._exclusive):
                raise ValueError(f"{self.kind} '{name}' is already registered")
            params = self._parameters(plugin)
            leading = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            bad = [p.name for p in leading[self.positional:]]
            bad += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
            if len(leading) < self.positional or bad:
                raise ValueError(
                    f"{self.kind} '{name}': options must be keyword-only parameters with defaults"
                    + (f" after {self.positional} positional parameter(s)" if self.positional else "")
                    + (f"; offending parameters: {', '.join(bad)}" if bad else "")
                )
            self._items[name] = plugin
            return plugin

        return add

    def add(self, name: str, plugin: T) -> T:
        """Register ``plugin`` under ``name`` without a decorator."""
        return self.register(name)(plugin)

    def copy(self) -> Registry[T]:
        """A registry with the same plugins (tests register names without leaking them)."""
        twin: Registry[T] = Registry(self.kind, positional=self.positional, exclusive_with=self._exclusive)
        twin._items = dict(self._items)
        return twin

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> T:
        """The plugin registered under ``name``; an unknown name lists the registered ones."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}")
        return self._items[name]

    def options(self, name: str) -> dict[str, Any]:
        """The options of plugin ``name`` with their defaults."""
        return {p.name: p.default for p in self._parameters(self.get(name)) if p.kind is p.KEYWORD_ONLY}

    def check_options(self, name: str, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the first option of ``options`` that ``name`` does not take."""
        valid = self.options(name)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            listed = ", ".join(sorted(valid)) if valid else "none"
            raise ValueError(f"{self.kind} '{name}' has no option '{unknown[0]}'; valid options: {listed}")

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """``plugin(*args, **options)`` after checking the name and the option names."""
        plugin = self.get(name)
        self.check_options(name, options)
        return plugin(*args, **options)

    @staticmethod
    def _parameters(plugin: Callable[..., Any]) -> list[inspect.Parameter]:
        target = plugin.__init__ if inspect.isclass(plugin) else plugin  # type: ignore[misc]
        params = list(inspect.signature(target).parameters.values())
        if inspect.isclass(plugin):
            params = params[1:]  # self
        return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
