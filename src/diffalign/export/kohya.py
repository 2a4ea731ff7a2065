"""kohya-style LoRA files: the single `.safetensors` that ComfyUI, AUTOMATIC1111 and Forge load for SD1.x and SDXL.

Key rules (read from kohya sd-scripts `networks/lora.py`, ComfyUI `comfy/lora.py` + `comfy/utils.py`
`unet_to_diffusers`, A1111 `extensions-builtin/Lora/networks.py`):

- a module's LoRA is `<name>.lora_down.weight` [r, in], `<name>.lora_up.weight` [out, r] and `<name>.alpha` (a
  0-d tensor); the applied update is `up @ down · alpha / r` — so `alpha` is the adapter's real `lora_alpha` (peft's
  scale is `lora_alpha / r`), not the rank;
- `<name>` is the module path with `.` → `_` behind a prefix: `lora_unet_` for the UNet, `lora_te_` for SD1.x's
  text encoder, `lora_te1_` / `lora_te2_` for SDXL's two;
- SD1.x UNet modules keep diffusers' names (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`,
  kohya trains SD1 on the diffusers UNet); SDXL UNet modules take the original SGM layout's names
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, kohya trains SDXL on the SGM UNet, and A1111/Forge
  match SDXL keys against that layout). `SGM_BLOCKS` computes that renaming from the UNet config.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

PREFIXES = {
    ("sd", "unet"): "lora_unet",
    ("sd", "text_encoder"): "lora_te",
    ("sdxl", "unet"): "lora_unet",
    ("sdxl", "text_encoder"): "lora_te1",
    ("sdxl", "text_encoder_2"): "lora_te2",
}
BASE_MODEL_VERSION = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def sgm_block_map(unet_config: dict) -> dict[str, str]:
    """diffusers attention-block paths → SGM (original SDXL) paths, from the UNet config.

    With `L = layers_per_block`: `down_blocks.i.attentions.j` → `input_blocks.{1 + i·(L+1) + j}.1`,
    `mid_block.attentions.0` → `middle_block.1`, `up_blocks.i.attentions.j` → `output_blocks.{i·(L+1) + j}.1`
    (input block 0 is `conv_in`; each down level ends with a downsampler block, each up level has L+1 layers).
    """
    lpb = unet_config["layers_per_block"]
    lpb = lpb if isinstance(lpb, int) else lpb[0]
    levels = len(unet_config["block_out_channels"])
    table = {"mid_block.attentions.0": "middle_block.1"}
    for i in range(levels):
        for j in range(lpb):
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * (lpb + 1) + j}.1"
        for j in range(lpb + 1):
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (lpb + 1) + j}.1"
    return table


_ATTN_BLOCK = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.(.+)$")


def module_name(family: str, component: str, module: str, sgm: dict[str, str] | None = None) -> str:
    """The kohya name of a diffusers module path (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`)."""
    prefix = PREFIXES.get((family, component))
    if prefix is None:
        raise ValueError(
            f"kohya export supports SD1.x/SD2.x and SDXL UNet/text-encoder LoRAs, got {family}/{component}"
        )
    if family == "sdxl" and component == "unet":
        match = _ATTN_BLOCK.match(module)
        if match is None or match.group(1) not in (sgm or {}):
            raise ValueError(
                f"module {module!r} is outside the UNet's attention blocks, the only part of the SDXL kohya layout "
                "mapped here (train with the default `lora_target_modules`)"
            )
        module = f"{sgm[match.group(1)]}.{match.group(2)}"
    return f"{prefix}_{module.replace('.', '_')}"


def kohya_state_dict(
    family: str, lora: dict[str, dict[str, tuple]], alpha: float, unet_config: dict
) -> dict[str, torch.Tensor]:
    """`lora[component][module] = (down, up)` → kohya keys, every module with its `alpha`."""
    sgm = sgm_block_map(unet_config) if family == "sdxl" else None
    out: dict[str, torch.Tensor] = {}
    for component, modules in lora.items():
        for module, (down, up) in sorted(modules.items()):
            name = module_name(family, component, module, sgm)
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_metadata(family: str, rank: int, alpha: float, config: dict, output_name: str) -> dict[str, str]:
    """`ss_*` metadata as kohya writes it (strings), plus diffalign's own training facts."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_output_name": output_name,
        "ss_sd_model_name": str(config.get("model", "")),
        "ss_resolution": f"({config.get('resolution')}, {config.get('resolution')})",
        "ss_learning_rate": str(config.get("learning_rate")),
        "ss_max_train_steps": str(config.get("max_steps")),
        "ss_training_comment": f"diffalign {config.get('method', '')} (beta {config.get('beta')})".strip(),
    }
    for key in ("method", "beta", "batch_size", "gradient_accumulation_steps", "seed"):
        if config.get(key) is not None:
            meta[f"diffalign_{key}"] = str(config[key])
    return meta


def save_kohya(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path
