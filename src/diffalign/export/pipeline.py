"""A complete diffusers pipeline folder from a run: the base with the LoRA fused at its real scale, or with the
fully fine-tuned denoiser swapped in. It loads with a stock `DiffusionPipeline.from_pretrained(folder)`."""

from __future__ import annotations

from pathlib import Path

from diffalign.export.runs import LORA_FILE, RunWeights


def export_pipeline(weights: RunWeights, base: str, out: Path) -> Path:
    import torch
    from diffusers import DiffusionPipeline

    from diffalign.backbones.base import _dtype_kwarg

    pipe = DiffusionPipeline.from_pretrained(base, **_dtype_kwarg(torch.float32))
    if weights.full_denoiser is not None:
        name = weights.full_denoiser.name
        denoiser_cls = type(getattr(pipe, name))
        setattr(pipe, name, denoiser_cls.from_pretrained(weights.full_denoiser))
        pipe.register_modules(**{name: getattr(pipe, name)})
    else:
        if weights.step is not None:  # a checkpoint: write its LoRA as a diffusers file first
            raise ValueError("export a checkpoint's LoRA with `--format kohya`, or its run's final/ as diffusers")
        pipe.load_lora_weights(str(weights.source), weight_name=LORA_FILE, adapter_name="diffalign")
        pipe.fuse_lora(lora_scale=1.0, adapter_names=["diffalign"])
        pipe.unload_lora_weights()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    return out
