"""Every format for other runtimes in one room: kohya LoRAs (ComfyUI, A1111/Forge), complete diffusers pipeline
folders, model cards and hub upload. `diffalign export` is a thin CLI over `export_run`.

>>> from diffalign.export import export_run
>>> export_run("runs/dpo", "kohya", "dpo_sd15.safetensors")        # one standalone file for ComfyUI / A1111
>>> export_run("runs/dpo", "diffusers", "dpo_sd15_pipeline/")      # LoRA fused into a full pipeline folder
"""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.config import ConfigError
from diffalign.export.runs import RunWeights, load_run

FORMATS = ("kohya", "diffusers")

__all__ = ["FORMATS", "RunWeights", "export_run", "load_run", "publish_run"]


def publish_run(final: str | Path, repo_id: str, private: bool = True) -> str:
    """Write a model card into a run's `final/` (LoRA or full) and upload that folder to `repo_id`; the train
    config's `push_to_hub` calls this. Returns the repo URL."""
    from diffalign.backbones import detect_family
    from diffalign.export.card import push_to_hub, write_model_card

    weights = load_run(final)
    base = _base_model(weights)
    write_model_card(Path(final), weights, base, detect_family(base), repo_id=repo_id)
    return push_to_hub(final, repo_id, private=private)


def _base_model(weights: RunWeights) -> str:
    from diffalign.backbones.base import resolve_model_path

    if "model" not in weights.config:
        raise ConfigError(f"the run config of {str(weights.source)!r} names no `model`")
    return resolve_model_path(weights.config["model"])


def export_run(run: str | Path, fmt: str, out: str | Path, card: bool = True) -> Path:
    """Write the run's result as `fmt` (`kohya`: one `.safetensors` file; `diffusers`: a pipeline folder with a
    model card) to `out`; returns the written path."""
    if fmt not in FORMATS:
        raise ConfigError(f"`--format` must be one of {', '.join(FORMATS)}, got {fmt!r}")
    weights = load_run(run)
    base = _base_model(weights)
    from diffalign.backbones import detect_family

    family = detect_family(base)
    if fmt == "kohya":
        return _export_kohya(weights, base, family, Path(out))
    from diffalign.export.pipeline import export_pipeline

    folder = export_pipeline(weights, base, Path(out))
    if card:
        from diffalign.export.card import write_model_card

        write_model_card(folder, weights, base, family)
    return folder


def _export_kohya(weights: RunWeights, base: str, family: str, out: Path) -> Path:
    from diffalign.export.kohya import kohya_metadata, kohya_state_dict, save_kohya

    if not weights.lora:
        raise ConfigError(
            f"{str(weights.source)!r} is a full fine-tune, not a LoRA: export it with `--format diffusers`"
        )
    if family not in ("sd", "sdxl"):
        raise ConfigError(f"kohya export is for SD1.x/SD2.x and SDXL; {family} LoRAs already load as diffusers files")
    unet_config = json.loads((Path(base) / "unet" / "config.json").read_text())
    try:
        state = kohya_state_dict(family, weights.lora, weights.lora_alpha, unet_config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    meta = kohya_metadata(family, weights.lora_rank, weights.lora_alpha, weights.config, out.stem)
    return save_kohya(out, state, meta)
