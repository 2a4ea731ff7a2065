"""Tiny, random-weight diffusers pipeline folders in the real on-disk formats, written offline.

Each `make_tiny_*` writes a folder that loads with the stock pipeline class's `from_pretrained` (and with
`diffalign.backbones.load_backbone`) and returns its path. Sizes are chosen so that building a folder takes well under
a second or two on CPU and a training step on 16x16-pixel images (8x8 latents) takes milliseconds:

- VAE: `AutoencoderKL` with 2 blocks (32, 64) → down-sampling factor 2, 4 latent channels.
- text encoders: 2-layer CLIP text models of width 32 (SD3/SDXL second encoder with a 32-d projection), over a
  word-level tokenizer (`write_word_tokenizer`) whose vocabulary is `WORDS`, padded to 16 tokens.
- denoisers: a 2-level `UNet2DConditionModel` (32, 64) or a 2-layer `SD3Transformer2DModel`, `sample_size` 8.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffalign.toyworld.tokenizer import write_word_tokenizer

WORDS = (
    "a an the red blue green yellow pink white black circle square triangle star on in of and with "
    "background photo painting cat dog small big left right top bottom"
).split()
MAX_TOKENS = 16
CLIP_WIDTH = 32
PROJECTION_DIM = 32
LATENT_CHANNELS = 4
CLIP_VOCAB = 512  # ≥ the word tokenizer's size (checked in `_tokenizer`)


def _vae(latent_channels: int = LATENT_CHANNELS, **kwargs) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=16,
        **kwargs,
    )


def _clip_config(projection: bool, width: int = CLIP_WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=PROJECTION_DIM if projection else CLIP_WIDTH,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _tokenizer(path: Path):
    tokenizer = write_word_tokenizer(WORDS, path, model_max_length=MAX_TOKENS)
    if len(tokenizer) > CLIP_VOCAB:
        raise ValueError(f"word tokenizer has {len(tokenizer)} tokens, more than the tiny CLIP vocab")
    return tokenizer


def _clip(cls, path: Path, projection: bool, width: int = CLIP_WIDTH):
    tokenizer = _tokenizer(path)
    config = _clip_config(projection, width)
    config.eos_token_id = tokenizer.eos_token_id  # CLIP pools at the first EOS
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return cls(config).eval(), tokenizer


def _unet(cross_attention_dim: int, **kwargs) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        **kwargs,
    )


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny `StableDiffusionPipeline` folder (SD1.x layout) and return its path.

    Args:
        path (`str | Path`): folder to create.
        prediction_type (`str`, *optional*, defaults to `"epsilon"`): `"epsilon"` or `"v_prediction"` (SD2.x-v).
    """
    path = Path(path)
    torch.manual_seed(0)
    text_encoder, tokenizer = _clip(CLIPTextModel, path / "_scratch" / "tok", projection=False)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.5),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(CLIP_WIDTH),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, path)


def make_tiny_sdxl(path: str | Path, width_2: int = CLIP_WIDTH) -> Path:
    """Write a tiny `StableDiffusionXLPipeline` folder (two CLIP encoders, `text_time` micro-conditioning).

    `width_2` is the second encoder's width; a value other than the first's (as in real SDXL, 768 vs 1280) lets
    `from_single_file` tell the two encoders apart by shape.
    """
    path = Path(path)
    torch.manual_seed(0)
    text_encoder, tokenizer = _clip(CLIPTextModel, path / "_scratch" / "tok", projection=False)
    text_encoder_2, tokenizer_2 = _clip(
        CLIPTextModelWithProjection, path / "_scratch" / "tok2", projection=True, width=width_2
    )
    time_dim = 8
    unet = _unet(
        CLIP_WIDTH + width_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + PROJECTION_DIM,
        use_linear_projection=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.5, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _save(pipe, path)


SD3_LAYOUTS = {
    "sd3": {},
    "sd35_medium": {"dual_attention_layers": (0,), "qk_norm": "rms_norm"},  # MMDiT-X: self-attention in layer 0
    "sd35_large": {"qk_norm": "rms_norm"},
}
"""Transformer config differences between SD3-medium, SD3.5-medium and SD3.5-large (their `transformer/config.json`:
3.5 adds RMS q/k normalisation; 3.5-medium adds a second, image-only attention to its first 13 blocks)."""


def make_tiny_sd3(path: str | Path, with_t5: bool = False, layout: str = "sd3") -> Path:
    """Write a tiny `StableDiffusion3Pipeline` folder (CLIP-L/G stand-ins with projection, optional T5).

    Without T5 (`with_t5=False`) `text_encoder_3`/`tokenizer_3` are saved as `null`, like running SD3 without T5; the
    pipeline then feeds zeros in place of the T5 tokens. `layout` picks the transformer of SD3 (`"sd3"`), SD3.5-medium
    (`"sd35_medium"`) or SD3.5-large (`"sd35_large"`), see `SD3_LAYOUTS`.
    """
    path = Path(path)
    torch.manual_seed(0)
    text_encoder, tokenizer = _clip(CLIPTextModelWithProjection, path / "_scratch" / "tok", projection=True)
    text_encoder_2, tokenizer_2 = _clip(CLIPTextModelWithProjection, path / "_scratch" / "tok2", projection=True)
    joint_dim = 2 * CLIP_WIDTH  # = T5 width; CLIP features are zero-padded up to it
    text_encoder_3, tokenizer_3 = _t5(joint_dim) if with_t5 else (None, None)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        caption_projection_dim=16,  # = heads × head dim (the text stream runs at the transformer width)
        pooled_projection_dim=2 * PROJECTION_DIM,
        pos_embed_max_size=16,
        **SD3_LAYOUTS[layout],
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _save(pipe, path)


def _t5(width: int) -> tuple[T5EncoderModel, T5Tokenizer]:
    """A 1-layer T5 encoder over a Unigram tokenizer whose pieces are `▁word` for every word in `WORDS`."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(f"▁{w}", -1.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_TOKENS)
    config = T5Config(
        vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    return T5EncoderModel(config).eval(), tokenizer


def _save(pipe, path: Path) -> Path:
    pipe.save_pretrained(path)
    shutil.rmtree(path / "_scratch", ignore_errors=True)
    return path


FLUX_LATENT_CHANNELS = 16


def make_tiny_flux(path: str | Path, guidance_embeds: bool = True, dynamic_shift: bool = True) -> Path:
    """Write a tiny `FluxPipeline` folder in the FLUX.1 layout: CLIP-L stand-in (pooled output only), T5 (sequence),
    a 16-channel VAE with scaling and shift factors, and a `FluxTransformer2DModel` over packed 2x2 latents.

    Args:
        guidance_embeds (`bool`, *optional*, defaults to `True`): FLUX.1-dev (guidance-distilled, a guidance
            embedding) when True; FLUX.1-schnell (no guidance embedding) when False.
        dynamic_shift (`bool`, *optional*, defaults to `True`): the scheduler of FLUX.1-dev (`use_dynamic_shifting`,
            shift 3.0); False gives schnell's static `shift=1.0` scheduler.
    """
    path = Path(path)
    torch.manual_seed(0)
    text_encoder, tokenizer = _clip(CLIPTextModel, path / "_scratch" / "tok", projection=False)
    t5_width = 32
    text_encoder_2, tokenizer_2 = _t5(t5_width)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,  # 2x2 packed patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    if dynamic_shift:  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )  # fmt: skip
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    vae = _vae(
        latent_channels=FLUX_LATENT_CHANNELS, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _save(pipe, path)
