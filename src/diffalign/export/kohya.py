"""LoRA in kohya sd-scripts format: one `.safetensors` that ComfyUI, AUTOMATIC1111 and Forge load for SD1.x and SDXL.

Format (kohya sd-scripts `networks/lora.py`): per adapted module `<name>.lora_down.weight` (A, `[r, in]`),
`<name>.lora_up.weight` (B, `[out, r]`) and a scalar `<name>.alpha`; runtimes apply ΔW = (alpha / r) · B A, so
`alpha` is the run's real `lora_alpha` (peft's scale α / r), never the rank. Module names are `lora_unet_…`,
`lora_te_…` (SD1.x text encoder) or `lora_te1_…`/`lora_te2_…` (SDXL), followed by the module path with `.` → `_`:

- SD1.x/2.x UNet: kohya's own (diffusers-like) module paths, `lora_unet_down_blocks_0_attentions_0_…`. ComfyUI maps
  them through `comfy.utils.unet_to_diffusers`, AUTOMATIC1111 through `convert_diffusers_name_to_compvis`.
- SDXL UNet: kohya trains SDXL on the SGM layout, so its names are `lora_unet_input_blocks_4_1_transformer_blocks_0_…`.
  ComfyUI accepts `lora_unet_` + any SGM weight name; AUTOMATIC1111 replaces `lora_unet` by `diffusion_model`.
- Text encoders: transformers CLIP paths, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.
- FLUX.1 transformer: `lora_transformer_` + the diffusers module path
  (`lora_transformer_transformer_blocks_0_attn_to_q`, `lora_transformer_single_transformer_blocks_0_attn_to_k`), the
  naming OneTrainer writes. ComfyUI maps every
  diffusers FLUX module to its BFL weight (or the q/k/v slice of the fused `qkv`/`linear1`) under exactly this name
  (`comfy.lora.model_lora_keys_unet`, "onetrainer"); diffusers reads it back in
  `lora_conversion_utils._convert_kohya_flux_lora_to_diffusers`. kohya sd-scripts' own FLUX names
  (`lora_unet_double_blocks_0_img_attn_qkv`) fuse q, k and v into one LoRA of the BFL layout; they are not written.

diffusers reads both namings back (`load_lora_weights` converts kohya/SGM names), which the tests use to check that a
kohya file gives the same images as the native diffusers file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.config import ConfigError
from diffalign.export.keymaps import hf_clip_keys, kohya_module_name, unet_block_table, unet_name_to_sgm
from diffalign.export.runs import RunWeights

KOHYA_PREFIXES = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "flux": {"transformer": "lora_transformer", "text_encoder": "lora_te1"},
}
BASE_MODEL_VERSION = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
ARCHITECTURE = {
    "sd": "stable-diffusion-v1/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "flux": "flux-1-dev/lora",
}


def kohya_names(run: RunWeights) -> dict[str, str]:
    """`{diffusers module (with component): kohya module name}` for every LoRA module of `run`."""
    if run.lora is None:
        raise ConfigError(f"`--format kohya` needs a LoRA run; '{run.source}' is a full fine-tune: use --format "
                          "single-file or diffusers")  # fmt: skip
    if run.family not in KOHYA_PREFIXES:
        raise ConfigError(
            f"`--format kohya` supports SD1.x/2.x, SDXL and FLUX.1, got a {run.family!r} run; SD3 LoRAs in diffusers "
            "format already load in ComfyUI/Forge: use --format lora"
        )
    return module_names(run.family, list(run.lora), _unet_config(run.base) if run.family == "sdxl" else None)


def module_names(family: str, modules: list[str], unet_config: dict | None = None) -> dict[str, str]:
    """`{diffusers module: kohya name}` for `family` (`"sd"`, `"sdxl"` or `"flux"`); SDXL needs the UNet config (its
    block layout decides the SGM numbering)."""
    prefixes = KOHYA_PREFIXES[family]
    table = unet_block_table(unet_config) if family == "sdxl" else None
    names = {}
    for module in modules:
        component, path = module.split(".", 1)
        if component not in prefixes:
            raise ConfigError(f"LoRA module {module!r} belongs to {component!r}, which kohya files cannot name")
        if component in ("unet", "transformer"):
            path = unet_name_to_sgm(path, table) if table is not None else path
        else:
            path = next(iter(hf_clip_keys({path: None})))
        names[module] = kohya_module_name(prefixes[component], path)
    return names


def _unet_config(base: str) -> dict:
    from diffusers import UNet2DConditionModel

    return dict(UNet2DConditionModel.load_config(base, subfolder="unet"))


def to_kohya(run: RunWeights, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The kohya state dict of `run`'s LoRA: `lora_down`, `lora_up` and `alpha` (= `lora_alpha`) per module."""
    names = kohya_names(run)
    alpha = torch.tensor(float(run.lora_alpha), dtype=dtype)
    out = {}
    for module, name in names.items():
        down, up = run.lora[module]
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.alpha"] = alpha.clone()
    return out


def kohya_metadata(run: RunWeights, output_name: str) -> dict[str, str]:
    """`ss_*` (kohya sd-scripts) and `modelspec.*` (Stability's model spec) metadata, as the runtimes' LoRA browsers
    read it, plus the training facts (`ss_training_method`, `ss_beta`, `ss_steps`, ...)."""
    cfg = run.config
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(run.lora_rank),
        "ss_network_alpha": _num(run.lora_alpha),
        "ss_base_model_version": BASE_MODEL_VERSION[run.family],
        "ss_sd_model_name": Path(run.base).name,
        "ss_output_name": output_name,
        "ss_v2": "False",
        "ss_training_method": run.method or "unknown",
        "ss_beta": _num(cfg.get("beta")),
        "ss_steps": str(run.step if run.step is not None else cfg.get("max_steps", "")),
        "ss_max_train_steps": str(cfg.get("max_steps", "")),
        "ss_learning_rate": _num(cfg.get("learning_rate")),
        "ss_resolution": str(cfg.get("resolution", "")),
        "ss_seed": str(cfg.get("seed", "")),
        "ss_mixed_precision": str(cfg.get("mixed_precision", "")),
        "ss_training_comment": _comment(run),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _architecture(run),
        "modelspec.title": output_name,
        "diffalign_negative_adapter": str(run.is_negative),
    }
    return {k: v for k, v in meta.items() if v not in ("", "None")}


def _architecture(run: RunWeights) -> str:
    """Stability's model-spec architecture id; FLUX.1 dev and schnell differ by the guidance embedding."""
    if run.family == "flux":
        from diffusers import FluxTransformer2DModel

        config = FluxTransformer2DModel.load_config(run.base, subfolder="transformer")
        return "flux-1-dev/lora" if config.get("guidance_embeds") else "flux-1-schnell/lora"
    return ARCHITECTURE[run.family]


def _num(value) -> str:
    return "" if value is None else f"{float(value):g}"


def _comment(run: RunWeights) -> str:
    text = f"diffalign {run.method or 'run'} (beta {_num(run.config.get('beta'))})"
    if run.is_negative:
        text += "; NEGATIVE adapter: apply it to the unconditional/negative CFG branch only, not as a normal LoRA"
    return text


def export_kohya(run: RunWeights, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `run`'s LoRA as one kohya-format `.safetensors` file with `ss_*` metadata; returns its path."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"`--out` must be a .safetensors file for --format kohya, got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_kohya(run, dtype), str(out), metadata=kohya_metadata(run, out.stem))
    return out
