"""Peak training memory of a LoRA run, estimated from parameter counts: the formula behind the low-VRAM presets.

    peak ≈ W_denoiser + W_text + W_vae + P_lora·(4 + 4 + S_opt) + A

- `W_denoiser`: frozen denoiser. Unquantised: every parameter and buffer × b (b = 2 bytes in bf16/fp16, 4 in fp32;
  SD3's positional-embedding table is a buffer: 0.45 GB for SD3.5 Medium). With `base_quantization`: its `nn.Linear`
  weights × q + one scale per output row (int8: b bytes, fp8: 4 bytes) and every other parameter (convolutions,
  norms, biases, embeddings) and buffer × b; q = 1 (int8, fp8) or 0.5 + 1/64 + 4/(64·256) (nf4: 4-bit codes, an
  8-bit scale per block of 64, an fp32 scale per 256 blocks).
- `W_text`: the text encoders × b, or 0 when they are released after caching (`offload_text_encoders`).
- `W_vae`: the VAE × b (kept: it is small and makes validation images).
- `P_lora` = rank × Σ over the targeted layers of (in + out) features; each trainable weight holds an fp32 value,
  an fp32 gradient and `S_opt` bytes of optimizer state (AdamW 8, 8-bit AdamW 2, Adafactor ≈ 0: factored).
- `A`: activations of one micro-batch (a DPO pair = 2 images through the policy with gradients, then the reference
  without) with gradient checkpointing, in 16-bit: `images × (a_text + a_1024 · (resolution / 1024)²)` bytes —
  a part that grows with the pixels and one that does not (text tokens). SDXL: a_1024 = 0.50 GB and a_text =
  0.0085 GB per image, the line through CPU measurements at 256 and 512 px (`scripts/memory_estimate.py
  --measure`). DiTs (SD3.5, FLUX): the checkpointed blocks' inputs plus one block recomputed, `(L + k) · T · d · 2`
  bytes per image with T tokens (4096 image tokens at 1024 px; the text tokens give a_text), d the width, L the
  blocks and k = 28 values of width d per token alive inside one block — k fitted to SD3.5 Medium's CPU measurement
  at 256 and 512 px (161 KB per token per image = (24 + 28) · 1536 · 2). For SD3.5 Large and FLUX this is an
  extrapolation, not a measurement.

What it leaves out: the CUDA context and allocator fragmentation (add ≈ 0.5–1 GB on a GPU); the caching pass, when the
text encoders sit next to the quantised denoiser until they are released (add `text_encoders` to the rest); host RAM
(the backbone loads the denoiser in fp32 on the CPU, where setup casts and quantises it before the move); data
loading.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": NF4_BYTES}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0}


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of one model layout (what the formula needs).

    Args:
        name (`str`): e.g. `"SDXL"`.
        linear (`int`): parameters in the denoiser's `nn.Linear` weights (what `base_quantization` quantises).
        linear_rows (`int`): Σ out_features over those layers (one scale each for int8/fp8).
        other (`int`): every other denoiser parameter (convolutions, norms, biases, embeddings).
        text (`int`): all text encoders.
        vae (`int`): the VAE.
        lora_per_rank (`int`): Σ (in + out) over the layers LoRA targets by default (parameters per unit of rank).
        act_bytes_1024 (`float`): `a_1024`, activation bytes per image at 1024 px that scale with the pixels.
        act_source (`str`): where `a` comes from ("measured ..." or "estimated ...").
        buffers (`int`): the denoiser's buffer elements (SD3's positional-embedding table).
        act_text_bytes (`float`): `a_text`, activation bytes per image that do not scale with the pixels.
    """

    name: str
    linear: int
    linear_rows: int
    other: int
    text: int
    vae: int
    lora_per_rank: int
    act_bytes_1024: float
    act_source: str = "estimated"
    buffers: int = 0
    act_text_bytes: float = 0.0


def denoiser_bytes(counts: ModelCounts, quantization: str = "none", precision: str = "bf16") -> float:
    """`W_denoiser`: the frozen denoiser's bytes."""
    b = DTYPE_BYTES[precision]
    if quantization == "none":
        return (counts.linear + counts.other + counts.buffers) * b
    scale = {"int8": b, "fp8": 4, "nf4": 0}[quantization]
    quantized = counts.linear * QUANT_BYTES[quantization] + counts.linear_rows * scale
    return quantized + (counts.other + counts.buffers) * b


def estimate(
    counts: ModelCounts,
    *,
    quantization: str = "none",
    precision: str = "bf16",
    lora_rank: int = 8,
    optimizer: str = "adamw",
    text_encoders_resident: bool = True,
    images: int = 2,
    resolution: int = 1024,
) -> dict[str, float]:
    """Peak bytes of a LoRA run by part (`denoiser`, `text_encoders`, `vae`, `lora`, `activations`) and `total`.
    `images` = images per micro-batch (2 × `batch_size` for pairwise methods)."""
    b = DTYPE_BYTES[precision]
    parts = {
        "denoiser": denoiser_bytes(counts, quantization, precision),
        "text_encoders": counts.text * b if text_encoders_resident else 0.0,
        "vae": counts.vae * b,
        "lora": lora_rank * counts.lora_per_rank * (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer]),
        "activations": images * (counts.act_text_bytes + counts.act_bytes_1024 * (resolution / 1024) ** 2) * (b / 2),
    }
    parts["total"] = sum(parts.values())
    return parts


def dit_activation_bytes(blocks: int, tokens: int, width: int, k: int = 28, bytes_per_value: int = 2) -> float:
    """`a` for a DiT with per-block gradient checkpointing: `(blocks + k) · tokens · width · bytes`."""
    return (blocks + k) * tokens * width * bytes_per_value


# ---- layouts of the released models (counted on the meta device: no weights, no downloads) ------------------------
# SDXL: measured on CPU with `scripts/memory_estimate.py --measure` (bf16, LoRA r8, 1 pair, unquantised): peak RSS of
# the step minus weights, LoRA and AdamW state = 0.079 GB per pair at 256 px and 0.265 at 512 px; the line through
# them is 0.017 + 9.46e-7 GB per pixel per pair, i.e. per image a_text = 0.0085 GB and a_1024 = 0.50 GB (at 128 px
# the step still peaks at 0.080: a floor below 256 px). Quantised layers add dequantisation transients (at 256 px:
# int8 +0.02 GB, nf4 +0.09 GB). See the README memory table.
SDXL_ACT_BYTES_1024, SDXL_ACT_TEXT_BYTES = 0.50e9, 0.0085e9
SDXL_ACT_SOURCE = "measured on CPU at 256 and 512 px (bf16, grad ckpt), extrapolated to 1024 px"
LAYOUTS = {
    "sdxl": {"denoiser": ("diffusers", "UNet2DConditionModel", dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))),
        "text": ["clip_l", "clip_g"], "vae": 4},
    "sd35-large": {"denoiser": ("diffusers", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
        "text": ["clip_l", "clip_g", "t5_xxl"], "vae": 16, "dit": dict(blocks=38, text_tokens=77 + 256, width=2432)},
    "sd35-medium": {"denoiser": ("diffusers", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
        "text": ["clip_l", "clip_g", "t5_xxl"], "vae": 16, "dit": dict(blocks=24, text_tokens=77 + 256, width=1536)},
    "flux-dev": {"denoiser": ("diffusers", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
        "text": ["clip_l", "t5_xxl"], "vae": 16, "dit": dict(blocks=19 + 38, text_tokens=512, width=3072)},
}  # fmt: skip
TEXT_ENCODERS = {
    "clip_l": ("CLIPTextModel", "CLIPTextConfig", dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        projection_dim=768)),
    "clip_g": ("CLIPTextModelWithProjection", "CLIPTextConfig", dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        projection_dim=1280, hidden_act="gelu")),
    "t5_xxl": ("T5EncoderModel", "T5Config", dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu")),
}  # fmt: skip
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def layout_counts(name: str, lora_targets: tuple[str, ...] = LORA_TARGETS) -> ModelCounts:
    """`ModelCounts` of a released layout (`sdxl`, `sd35-large`, `flux-dev`), built on the meta device (seconds)."""
    import diffusers
    import torch
    import transformers

    spec = LAYOUTS[name]
    _, cls_name, kwargs = spec["denoiser"]
    with torch.device("meta"):
        denoiser = getattr(diffusers, cls_name)(**kwargs)
        text = 0
        for enc in spec["text"]:
            model_cls, config_cls, cfg = TEXT_ENCODERS[enc]
            encoder = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg))
            text += sum(p.numel() for p in encoder.parameters())
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=spec["vae"],
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )  # fmt: skip
    counts = module_counts(denoiser, lora_targets)
    if "dit" in spec:
        d = spec["dit"]
        act = dit_activation_bytes(d["blocks"], (1024 // 16) ** 2, d["width"])
        act_text = dit_activation_bytes(d["blocks"], d["text_tokens"], d["width"])
        source = "(L + 28)·T·d·2 bytes, k fitted on SD3.5 Medium (CPU)"
    else:
        act, act_text, source = SDXL_ACT_BYTES_1024, SDXL_ACT_TEXT_BYTES, SDXL_ACT_SOURCE
    return ModelCounts(
        name=name,
        text=text,
        vae=sum(p.numel() for p in vae.parameters()),
        act_bytes_1024=act,
        act_text_bytes=act_text,
        act_source=source,
        **counts,
    )


def module_counts(denoiser, lora_targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, int]:
    """`linear`, `linear_rows`, `other` and `lora_per_rank` of a denoiser module (real or on the meta device)."""
    from torch import nn

    linear = rows = lora = 0
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear):
            linear += module.weight.numel()
            rows += module.out_features
            if any(name == t or name.endswith(f".{t}") for t in lora_targets):
                lora += module.in_features + module.out_features
    total = sum(p.numel() for p in denoiser.parameters())
    buffers = sum(b.numel() for b in denoiser.buffers() if b.is_floating_point())
    return {"linear": linear, "linear_rows": rows, "other": total - linear, "lora_per_rank": lora, "buffers": buffers}
