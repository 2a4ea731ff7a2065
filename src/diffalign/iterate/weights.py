"""Weights between rounds, with stock diffusers only.

- `fuse_into_pipeline`: the round's starting model εⁱ as a pipeline folder — the previous start with the previous
  round's LoRA fused in (`load_lora_weights` + `fuse_lora`, then `save_pretrained`), or its fully fine-tuned
  denoiser swapped in. A fresh LoRA on that folder starts exactly at εⁱ, and its reference (the same network with
  adapters off) is εⁱ: the reference reset SAIL asks for, with no change to the training loop.
- `concat_loras`: one LoRA over the *base* equal to the sum of the rounds' LoRAs, by stacking their ranks
  (B₁A₁·s₁ + B₂A₂·s₂ = [B₁s₁ B₂s₂]·[A₁; A₂]); the result loads with a stock pipeline's `load_lora_weights`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_DOWN = re.compile(r"\.(lora\.down|lora_A)\.weight$")
_UP = {"lora.down": "lora.up", "lora_A": "lora_B"}


def fuse_into_pipeline(start: str | Path, weights: str | Path, out: str | Path, denoiser_subfolder: str) -> Path:
    """Write `out/` = the pipeline at `start` with a round's `final/` applied: a LoRA fused into the denoiser, or
    a full `final/<denoiser_subfolder>` swapped in. Any `sampling.json` of `start` is kept. Written to a temporary
    folder and renamed, so a folder holding `model_index.json` is complete."""
    from diffusers import DiffusionPipeline

    start, weights, out = Path(start), Path(weights), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = DiffusionPipeline.from_pretrained(start)
    if (weights / LORA_FILE).is_file():
        pipe.load_lora_weights(str(weights), weight_name=LORA_FILE)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    else:
        trained = type(getattr(pipe, denoiser_subfolder)).from_pretrained(weights / denoiser_subfolder)
        setattr(pipe, denoiser_subfolder, trained)
        pipe.register_modules(**{denoiser_subfolder: trained})
    pipe.save_pretrained(tmp)
    if (start / "sampling.json").is_file():
        shutil.copy2(start / "sampling.json", tmp / "sampling.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def concat_loras(folders: list[str | Path], out: str | Path) -> Path:
    """Stack the ranks of several diffusers-format LoRAs (same target modules) into one whose delta is the sum of
    theirs, at scale 1 (`lora_alpha` = total rank). Each input's own scale `lora_alpha / r` is folded into its up
    (B) matrices. Returns `out/pytorch_lora_weights.safetensors`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, scales, meta = [], [], None
    for folder in folders:
        with safe_open(str(Path(folder) / LORA_FILE), "pt") as f:
            tensors.append({k: f.get_tensor(k) for k in f.keys()})
            info = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        prefix = next((k[: -len("r")] for k in info if k.endswith(".r") or k == "r"), "")
        if info.get(prefix + "rank_pattern") or info.get(prefix + "alpha_pattern"):
            raise ValueError(f"LoRA {str(folder)!r} has per-module ranks or alphas; `concat_loras` needs one of each")
        rank = info.get(prefix + "r")
        alpha = info.get(prefix + "lora_alpha", rank)
        scales.append(1.0 if rank is None else float(alpha) / float(rank))
        meta = meta or (info, prefix)
    merged, total_rank = {}, 0
    for key in tensors[0]:
        match = _DOWN.search(key)
        if match is None:
            continue
        up = key[: match.start()] + "." + _UP[match.group(1)] + ".weight"
        downs = [t[key].float() for t in tensors]
        ups = [t[up].float() * s for t, s in zip(tensors, scales)]
        merged[key] = torch.cat(downs, dim=0).contiguous()
        merged[up] = torch.cat(ups, dim=1).contiguous()
        total_rank = merged[key].shape[0]
    info, prefix = meta
    info = {**info, prefix + "r": total_rank, prefix + "lora_alpha": total_rank}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / LORA_FILE, metadata={"format": "pt", METADATA_KEY: json.dumps(info, indent=2)})
    return out / LORA_FILE
