"""Parameter-name tables between diffusers and the original (LDM / SGM) layouts, as data computed from configs.

The original Stable Diffusion code (CompVis LDM for SD1.x/2.x, Stability's SGM for SDXL) numbers the UNet as one flat
list of blocks: `input_blocks.k` (conv_in, then every down-block layer and downsampler), `middle_block.{0,1,2}` and
`output_blocks.k`. diffusers groups the same layers per resolution (`down_blocks.i.resnets.j`,
`down_blocks.i.attentions.j`, ...). With L = `layers_per_block`:

    down_blocks.i.{resnets,attentions}.j  ->  input_blocks.(1 + i·(L+1) + j).{0,1}
    down_blocks.i.downsamplers.0.conv     ->  input_blocks.((i+1)·(L+1)).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1  ->  middle_block.0 / 1 / 2
    up_blocks.i.{resnets,attentions}.j    ->  output_blocks.(i·(L+2) + j).{0,1}     (up blocks hold L+1 layers)
    up_blocks.i.upsamplers.0.conv         ->  output_blocks.(i·(L+2) + L+1).{2 if the block has attention else 1}.conv

Inside a block, transformer (attention) parameter names are identical in both layouts; ResNet parameters are renamed by
`UNET_RESNET`. The tables here are the inverse of diffusers' own single-file readers
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_open_clip_checkpoint`), derived from the block arithmetic above; tests check the round trip through them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
"""Top-level UNet modules (diffusers → LDM/SGM)."""

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
"""Modules inside a UNet ResNet block (diffusers → LDM/SGM)."""

VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}

OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
"""Modules inside one text-transformer layer (transformers CLIP → OpenCLIP `transformer.resblocks.k`)."""

OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_block_table(config: Mapping) -> dict[str, tuple[str, str]]:
    """`{diffusers block prefix: (LDM/SGM block prefix, kind)}` for a `UNet2DConditionModel` config, kind being
    `"resnet"`, `"attention"`, `"down"`/`"up"` (resampler conv) or `"top"`. Works for any block count and
    `layers_per_block` (an int, or one value per down block as diffusers allows)."""
    n = len(config["down_block_types"])
    layers = _per_block(config["layers_per_block"], n)
    table: dict[str, tuple[str, str]] = {k: (v, "top") for k, v in UNET_TOP.items()}
    k = 1
    for i, block_type in enumerate(config["down_block_types"]):
        for j in range(layers[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", "resnet")
            if "CrossAttn" in block_type:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", "attention")
            k += 1
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", "down")
            k += 1
    table["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    table["mid_block.attentions.0"] = ("middle_block.1", "attention")
    table["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    k = 0
    for i, (block_type, n_layers) in enumerate(zip(config["up_block_types"], reversed(layers))):
        attention = "CrossAttn" in block_type
        for j in range(n_layers + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", "resnet")
            if attention:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", "attention")
            k += 1
        if i < n - 1:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k - 1}.{2 if attention else 1}.conv", "up")
    return table


def _split_prefix(name: str, prefixes: Mapping) -> tuple[str, str] | None:
    """The longest key of `prefixes` that `name` starts with (at a `.` boundary), and the rest of `name`."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            return head, ".".join(parts[cut:])
    return None


def unet_name_to_sgm(name: str, table: Mapping[str, tuple[str, str]]) -> str:
    """A diffusers UNet module or parameter name (`down_blocks.1.resnets.0.conv1.weight`) → its LDM/SGM name
    (`input_blocks.4.0.in_layers.2.weight`).

    Raises:
        KeyError: `name` is in no block of `table` (e.g. a layer the original layout does not have).
    """
    found = _split_prefix(name, table)
    if found is None:
        raise KeyError(f"UNet parameter {name!r} has no LDM/SGM name (unknown block)")
    head, rest = found
    target, kind = table[head]
    if kind == "resnet" and rest:
        sub = _split_prefix(rest, UNET_RESNET)
        if sub is not None:
            rest = ".".join(p for p in (UNET_RESNET[sub[0]], sub[1]) if p)
    return ".".join(p for p in (target, rest) if p)


def unet_to_sgm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers `UNet2DConditionModel` state dict → LDM/SGM names (no prefix)."""
    table = unet_block_table(config)
    return {unet_name_to_sgm(k, table): v for k, v in state.items()}


_VAE_BLOCKS = (
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}", VAE_RESNET),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", lambda m, n: f"encoder.down.{m[1]}.downsample", {}),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}", VAE_RESNET),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample", {}),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)", lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}", VAE_RESNET),
    (r"(encoder|decoder)\.mid_block\.attentions\.0", lambda m, n: f"{m[1]}.mid.attn_1", VAE_ATTENTION),
    (r"(encoder|decoder)", lambda m, n: m[1], VAE_TOP),
)  # fmt: skip
"""(diffusers block regex, LDM block name from the match and the number of up blocks, renames inside the block)."""


def vae_name_to_ldm(name: str, num_up_blocks: int) -> str:
    """A diffusers `AutoencoderKL` parameter name → its LDM name (`first_stage_model.` not included). LDM numbers the
    decoder's up blocks from the lowest resolution, diffusers from the highest."""
    for pattern, block, renames in _VAE_BLOCKS:
        m = re.match(pattern + r"\.(.+)$", name)
        if m is None:
            continue
        rest = m[m.lastindex]
        sub = _split_prefix(rest, renames)
        if sub is not None:
            rest = ".".join(p for p in (renames[sub[0]], sub[1]) if p)
        return f"{block(m, num_up_blocks)}.{rest}"
    return name


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict → LDM names; the mid-block attention's linear q/k/v/proj_out weights
    become the original 1×1 convolutions (`[C, C]` → `[C, C, 1, 1]`)."""
    out = {}
    for key, value in state.items():
        new = vae_name_to_ldm(key, len(config["up_block_types"]))
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def hf_clip_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ≥ 5.6 saves `CLIPTextModel` without the `text_model.` wrapper; the original layouts (and kohya
    names) always have it. Adds it back where missing."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in state.items()
    }


def clip_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model (`CLIPTextModelWithProjection`) state dict → OpenCLIP names (SDXL's second
    encoder, `conditioner.embedders.1.model.` not included).

    OpenCLIP packs q, k, v into one `attn.in_proj_weight` `[3D, D]` (rows q, then k, then v) and applies the projection
    as `x @ text_projection` (so it stores the transpose of the linear layer's `[P, D]` weight).
    """
    state = hf_clip_keys(state)
    out = {OPENCLIP_TOP[k]: v for k, v in state.items() if k in OPENCLIP_TOP}
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    layer = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        m = layer.match(key)
        if m is None:
            continue
        i, module, kind = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module.endswith("q_proj"):
                qkv = [state[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            continue
        out[f"transformer.resblocks.{i}.{OPENCLIP_LAYER[module]}.{kind}"] = value
    return out


def kohya_module_name(prefix: str, module: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` →
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` (kohya sd-scripts: dots become `_`)."""
    return f"{prefix}_{module.replace('.', '_')}"
