"""Method trainers over one loop. `TRAINERS` maps a CLI method name to its trainer class.

Imports are lazy (PEP 562): `import diffalign.trainers` costs nothing until a trainer is used, so the CLI starts in
well under a second. `METHODS` names every method with its one-line summary without importing torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffalign.trainers.base import Trainer

# method -> (module, trainer class, config class, one-line summary shown by `diffalign train --help`)
METHODS: dict[str, tuple[str, str, str, str]] = {
    "dpo": ("dpo", "DPOTrainer", "DPOConfig", "Diffusion-DPO: preference pairs, shared t and ε within a pair."),
    "kto": ("kto", "KTOTrainer", "KTOConfig", "Diffusion-KTO: unpaired images flagged desirable/undesirable."),
    "npo": ("npo", "NPOTrainer", "NPOConfig", "Diffusion-NPO: DPO on reversed pairs → a negative adapter for CFG."),
    "self-npo": ("self_npo", "SelfNPOTrainer", "SelfNPOConfig", "Self-NPO: a negative adapter from the model's own "
                 "truncated sampling chains; no labels."),
    "smpo": ("smpo", "SmPOTrainer", "SmPOConfig", "SmPO-Diffusion: reward-smoothed DPO on ReNoise-inverted latents."),
    "tdpo": ("tpo", "TDPOTrainer", "TDPOConfig", "TDPO: prefer an image's own caption over a perturbed one (DPO)."),
    "tkto": ("tpo", "TKTOTrainer", "TKTOConfig", "TKTO: matched vs perturbed caption of one image (KTO)."),
    "sail": ("sail", "SAILTrainer", "SAILConfig", "SAIL: DPO from a small seed, then rounds of self-labelled pairs "
             "(DPO implicit reward) or reward-labelled ones (online DPO)."),
}  # fmt: skip

_EXPORTS = {cls: (module, cls) for module, cls, _, _ in METHODS.values()}
_EXPORTS |= {cfg: (module, cfg) for module, _, cfg, _ in METHODS.values()}
_EXPORTS |= {"Trainer": ("base", "Trainer"), "TrainingDivergedError": ("base", "TrainingDivergedError")}


def __getattr__(name: str) -> Any:
    if name == "TRAINERS":
        return {method: get_trainer(method) for method in METHODS}
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(f"diffalign.trainers.{module}"), attr)
    raise AttributeError(f"module 'diffalign.trainers' has no attribute {name!r}")


def get_trainer(method: str) -> type[Trainer]:
    """The trainer class of a CLI method name (`"dpo"`, `"self-npo"`, …)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    module, cls, _, _ = METHODS[method]
    return getattr(importlib.import_module(f"diffalign.trainers.{module}"), cls)


def train(method: str, config) -> Path:
    """Train `method` with a config (its config class, or a dict of keys) and return the `final/` folder."""
    cls = get_trainer(method)
    if isinstance(config, dict):
        from diffalign.config import build_config

        config = build_config(cls.config_class, config)
    return cls(config).train()


__all__ = ["METHODS", "TRAINERS", "get_trainer", "train", *sorted(_EXPORTS)]
