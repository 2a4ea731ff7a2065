"""Reward registry, in the style of open_clip's factory.

    reward = create("hps", version="v2.1", checkpoint="/models/HPS_v2.1_compressed.pt", device="cuda")
    scores = reward(images, prompts)   # Tensor[N], float32, CPU

A reward is a callable `(images, prompts) -> Tensor[N]`; `images` is a list of PIL images or a float tensor
`[N, 3, H, W]` in [0, 1]. The model is loaded once, in `create`. Weights are always passed as arguments
(`checkpoint`, `model`, `head`, ...), never encoded in the name. Heavy libraries are imported inside the factories.

Built-in rewards: `hps` (HPS v2.0/v2.1), `pickscore`, `clip`, `aesthetic` (LAION improved aesthetic predictor),
and, as a plug-in, `toy` (the toy world's exact reward).
"""

from __future__ import annotations

from typing import Any

from .base import MissingWeightsError, Reward, load_torch_checkpoint
from .registry import available, create, register


def parse_spec(spec: str | dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A reward as written in a config → `(label, name, kwargs)`.

    `"toy"` → `("toy", "toy", {})`; `{"name": "hps", "version": "v2.0", "checkpoint": ...}` →
    `("hps_v2.0", "hps", {...})`. An explicit `label` key names the reward in results.
    """
    if isinstance(spec, str):
        return spec, spec, {}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a reward must be a name or a mapping with a `name` key, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    label = kwargs.pop("label", None)
    if label is None:
        label = f"{name}_{kwargs['version']}" if "version" in kwargs else name
    return label, name, kwargs


# built-in rewards register themselves on import (their heavy imports stay inside the factories); plug-ins (the toy
# world's `toy`) are found by entry point (`diffalign.plugins`) when first asked for
from . import aesthetic, clip_rewards  # noqa: E402, F401

__all__ = ["MissingWeightsError", "Reward", "available", "create", "load_torch_checkpoint", "parse_spec", "register"]
