"""Backbones: one adapter per model family, picked from a pipeline folder's `model_index.json`.

>>> backbone = load_backbone("path/to/stable-diffusion-v1-5")  # or a Hub id when online
>>> backbone.family, backbone.prediction_type
('sd', 'epsilon')
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.backbones.base import Backbone, ModelNotFoundError, PipelineBackbone, resolve_model_path
from diffalign.backbones.flux import FluxBackbone
from diffalign.backbones.sd import SDBackbone
from diffalign.backbones.sd3 import SD3Backbone
from diffalign.backbones.sdxl import SDXLBackbone

BACKBONES: dict[str, type[PipelineBackbone]] = {
    "sd": SDBackbone,
    "sdxl": SDXLBackbone,
    "sd3": SD3Backbone,
    "flux": FluxBackbone,
}
PIPELINE_FAMILIES = {cls.pipeline_class.__name__: name for name, cls in BACKBONES.items()}

__all__ = [
    "BACKBONES",
    "Backbone",
    "FluxBackbone",
    "ModelNotFoundError",
    "PIPELINE_FAMILIES",
    "PipelineBackbone",
    "SD3Backbone",
    "SDBackbone",
    "SDXLBackbone",
    "detect_family",
    "load_backbone",
]


def detect_family(path_or_id: str | Path) -> str:
    """The backbone family (`"sd"`, `"sdxl"`, `"sd3"`, `"flux"`) of a pipeline folder or Hub id, from its
    `model_index.json` `_class_name`.

    Raises:
        ModelNotFoundError: not a local pipeline folder and the Hub cannot be used (see `resolve_model_path`).
        ValueError: the pipeline class is not supported.
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_path(path_or_id)
    class_name = DiffusionPipeline.load_config(path).get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"`model` '{path_or_id}' is a {class_name!r}; supported pipeline classes are {sorted(PIPELINE_FAMILIES)}"
        )
    return PIPELINE_FAMILIES[class_name]


def load_backbone(
    path_or_id: str | Path, *, frozen_dtype: torch.dtype = torch.float32, variant: str | None = None
) -> Backbone:
    """Load the right `Backbone` for a diffusers pipeline folder (or Hub id when online).

    Args:
        path_or_id (`str` or `Path`): local pipeline folder with `model_index.json`, or `org/name` on the Hub.
        frozen_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): precision of the frozen parts (text
            encoders, VAE unless it needs fp32); the denoiser always loads in fp32.
        variant (`str`, *optional*): weight file variant, e.g. `"fp16"`.
    """
    family = detect_family(path_or_id)
    return BACKBONES[family].from_pretrained(path_or_id, frozen_dtype=frozen_dtype, variant=variant)
