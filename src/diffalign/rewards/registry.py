"""The reward registry: `register(name)` for factories, `create(name, **kw)`, `available()`; names not built in are
looked up among the `diffalign.rewards` plug-ins (`diffalign.plugins`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffalign import plugins

from .base import Reward

_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: register a factory `(**kwargs) -> Reward` under `name`."""

    def wrap(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    """Names accepted by `create` (built in and plug-ins), sorted."""
    return sorted(set(_REGISTRY) | set(plugins.names("rewards")))


def create(name: str, **kwargs: Any) -> Reward:
    """Build the reward registered as `name`; `kwargs` go to its factory (weights paths, `device`, `dtype`,
    `batch_size`, ...). An unknown name raises a `ValueError` listing `available()`."""
    factory = _REGISTRY.get(name) or plugins.load("rewards", name)
    if factory is None:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}")
    reward = factory(**kwargs)
    reward.name = name
    return reward
