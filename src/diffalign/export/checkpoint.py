"""Whole-model exports: a `save_pretrained` pipeline folder and an original-layout single-file checkpoint.

A LoRA is fused into the base weights with its real scale, W' = W + (α / r) · B A (Hu et al. 2021, eq. 3); a full
fine-tune's denoiser replaces the base one. The single file uses the original key layouts that A1111/Forge/ComfyUI
and diffusers' `from_single_file` read (see `keymaps`):

- UNet: `model.diffusion_model.<LDM/SGM name>`; VAE: `first_stage_model.<LDM name>`;
- SD1.x text encoder: `cond_stage_model.transformer.<transformers CLIP name>`;
- SDXL: `conditioner.embedders.0.transformer.<CLIP-L name>` and `conditioner.embedders.1.model.<OpenCLIP name>`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.config import ConfigError
from diffalign.export.keymaps import clip_to_openclip, hf_clip_keys, unet_to_sgm, vae_to_ldm
from diffalign.export.runs import RunWeights

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"`--dtype` must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_merged_pipeline(run: RunWeights):
    """The base pipeline (fp32, stock diffusers class) with `run`'s weights in it: LoRA fused, or the fine-tuned
    denoiser loaded."""
    from diffusers import DiffusionPipeline

    from diffalign.backbones import BACKBONES

    kwargs = {"safety_checker": None, "requires_safety_checker": False} if run.family == "sd" else {}
    pipe = DiffusionPipeline.from_pretrained(run.base, **kwargs)
    denoiser = getattr(pipe, BACKBONES[run.family].denoiser_subfolder)
    if run.lora is not None:
        fuse_lora(pipe, run.lora, run.lora_alpha)
    else:
        missing, unexpected = denoiser.load_state_dict(run.denoiser_state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"the weights in '{run.source}' do not fit the base model '{run.base}' ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[:2]}); pass the run's own base config"
            )
    return pipe


@torch.no_grad()
def fuse_lora(pipe, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """W ← W + (α / r) · B A for every `component.module` of `lora`, in place, in float32."""
    for module, (down, up) in lora.items():
        component, path = module.split(".", 1)
        layer = getattr(pipe, component).get_submodule(path)
        delta = (alpha / down.shape[0]) * (up.float().flatten(1) @ down.float().flatten(1))
        layer.weight.copy_((layer.weight.float() + delta.reshape(layer.weight.shape)).to(layer.weight.dtype))


def export_diffusers(run: RunWeights, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A complete `save_pretrained` folder that stock `DiffusionPipeline.from_pretrained(out)` loads."""
    pipe = load_merged_pipeline(run)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def single_file_state(run: RunWeights, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The original-layout state dict of `run`'s full model (SD1.x/2.x with a CLIP-L encoder, or SDXL)."""
    if run.family not in ("sd", "sdxl"):
        raise ConfigError(f"`--format single-file` supports SD1.x and SDXL, got a {run.family!r} run; use --format "
                          "diffusers")  # fmt: skip
    pipe = load_merged_pipeline(run)
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_sgm(pipe.unet.state_dict(), pipe.unet.config).items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()}
    clip = hf_clip_keys(pipe.text_encoder.state_dict())
    if run.family == "sd":
        if type(pipe.text_encoder).__name__ != "CLIPTextModel":
            raise ConfigError("`--format single-file` for SD needs a CLIPTextModel text encoder (SD1.x)")
        state |= {f"cond_stage_model.transformer.{k}": v for k, v in clip.items()}
    else:
        state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()}
        openclip = clip_to_openclip(pipe.text_encoder_2.state_dict())
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in openclip.items()}
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items() if not k.endswith("position_ids")}


def export_single_file(run: RunWeights, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `single_file_state` to one `.safetensors` file; returns its path."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"`--out` must be a .safetensors file for --format single-file, got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(single_file_state(run, dtype), str(out), metadata={"format": "pt", "diffalign_base": run.base})
    return out
