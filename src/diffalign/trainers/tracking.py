"""Experiment trackers (tensorboard, wandb) through accelerate: the run's config in a form every tracker accepts,
and image panels.

tensorboard's hparams writer takes only int/float/str/bool/Tensor values, so lists (`validation_prompts`,
`lora_target_modules`) and `None` crashed every run at start; `tracker_config` flattens them. The full config is
also stored as YAML text (tensorboard's TEXT tab; wandb keeps it in the run's config).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

SCALAR_TYPES = (bool, int, float, str)


def tracker_config(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """`config` with every value a scalar: `None` → `"none"`, lists and mappings → compact JSON strings; nested
    mappings are JSON too (hparams are one flat table)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if value is None:
            flat[key] = "none"
        elif isinstance(value, SCALAR_TYPES):
            flat[key] = value
        else:
            flat[key] = json.dumps(value, ensure_ascii=False, default=str)
    return flat


def init_trackers(accelerator, project_name: str, config: dict[str, Any], config_yaml: str) -> None:
    """Start the configured trackers; tensorboard's hparams get a scalar-only config plus the full YAML as text,
    wandb the config as it is (lists stay lists)."""
    accelerator.init_trackers(project_name)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.store_init_configuration(tracker_config(config))
            tracker.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)
        else:
            tracker.store_init_configuration(config)


def log_images(accelerator, images: dict[str, list], step: int, captions: list[str] | None = None) -> None:
    """Log PIL images to every tracker: `{"val/samples": [img, ...]}`; tensorboard gets one NHWC uint8 batch per
    key, wandb a list of `wandb.Image` with `captions`."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for key, imgs in images.items():
                batch = np.stack([np.asarray(img.convert("RGB")) for img in imgs])
                tracker.writer.add_images(key, batch, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            caps = captions or [None] * max(len(v) for v in images.values())
            payload = {k: [wandb.Image(img, caption=c) for img, c in zip(v, caps)] for k, v in images.items()}
            tracker.log(payload, step=step)
