"""Contract suite for the backbone adapters, parametrized over SD (ε and v), SDXL and SD3 tiny pipelines.

Every numeric claim is checked against diffusers itself where it has an equivalent (the stock pipeline's
`encode_prompt`, `DDPMScheduler.add_noise/get_velocity`, `FlowMatchEulerDiscreteScheduler.scale_noise`,
`_get_add_time_ids`), and LoRA / full fine-tune outputs are loaded back with stock diffusers classes only.
"""

from __future__ import annotations

import copy
import sys
import time
import types

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0

from diffalign.backbones import (
    BACKBONES,
    ModelNotFoundError,
    SD3Backbone,
    SDBackbone,
    SDXLBackbone,
    detect_family,
    load_backbone,
)
from diffalign.backbones.attention import apply_attention, resolve_attention
from diffalign.backbones.base import resolve_model_path
from tiny_models import make_tiny_sd3

CASES = {
    # name: (fixture, class, pipeline class, prediction type, denoiser class)
    "sd": ("tiny_sd_path", SDBackbone, StableDiffusionPipeline, "epsilon", UNet2DConditionModel),
    "sd_v": ("tiny_sd_v_path", SDBackbone, StableDiffusionPipeline, "v_prediction", UNet2DConditionModel),
    "sdxl": ("tiny_sdxl_path", SDXLBackbone, StableDiffusionXLPipeline, "epsilon", UNet2DConditionModel),
    "sd3": ("tiny_sd3_path", SD3Backbone, StableDiffusion3Pipeline, "flow_matching", SD3Transformer2DModel),
}
PROMPTS = ["a red circle on blue background", ""]
# tiny models: CLIP pads to 16 tokens, width 32 (+32 for the second encoder); SD3 adds 256 T5 tokens
EMBED_SHAPES = {
    "sd": {"prompt_embeds": (2, 16, 32)},
    "sd_v": {"prompt_embeds": (2, 16, 32)},
    "sdxl": {"prompt_embeds": (2, 16, 64), "pooled_prompt_embeds": (2, 32)},
    "sd3": {"prompt_embeds": (2, 16 + 256, 64), "pooled_prompt_embeds": (2, 64)},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add OpenMP overhead, which explodes when the CPU is shared (measured
    77 s → 7 s for this file on 2 busy cores). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=list(CASES))
def case(request):
    name = request.param
    return name, request.getfixturevalue(CASES[name][0])


@pytest.fixture
def backbone(case):
    return load_backbone(case[1])


# network-level tests do not depend on the prediction type: once per family (overrides `case`'s params)
per_family = pytest.mark.parametrize("case", ["sd", "sdxl", "sd3"], indirect=True)


def _pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _noisy_batch(backbone, seed: int = 0):
    """x0, ε, t, x_t and the condition for PROMPTS at 8x8 latents."""
    g = torch.Generator().manual_seed(seed)
    x0 = backbone.encode_images(_pixels())
    eps = torch.randn(x0.shape, generator=g)
    t = backbone.sample_timesteps(2, generator=g)
    cond = backbone.build_condition(backbone.encode_prompts(PROMPTS))
    return x0, eps, t, backbone.add_noise(x0, eps, t), cond


# ---- loading -------------------------------------------------------------------------------------------------------
def test_load_backbone_detects_family(case, backbone):
    name, path = case
    _, cls, _, prediction_type, denoiser_cls = CASES[name]
    assert type(backbone) is cls
    assert BACKBONES[backbone.family] is cls
    assert detect_family(path) == backbone.family
    assert backbone.prediction_type == prediction_type
    assert isinstance(backbone.denoiser, denoiser_cls)
    assert backbone.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert backbone.num_train_timesteps == 1000
    assert backbone.vae_scale_factor == 2
    frozen = [p for m in backbone._frozen_modules().values() for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)


@per_family
def test_frozen_dtype_keeps_denoiser_fp32_and_upcasts_the_vae_only_for_fp16(case):
    """The tiny VAEs keep diffusers' default `force_upcast=True`: fp32 under fp16 (its range overflows), the frozen
    dtype under bf16 (the stock pipelines' rule)."""
    assert load_backbone(case[1], frozen_dtype=torch.float16).vae.dtype == torch.float32
    backbone = load_backbone(case[1], frozen_dtype=torch.bfloat16)
    assert backbone.denoiser.dtype == torch.float32
    assert backbone.vae.dtype == torch.bfloat16
    assert backbone.components["text_encoder"].dtype == torch.bfloat16
    embeds = backbone.encode_prompts(PROMPTS)
    assert embeds["prompt_embeds"].dtype == torch.bfloat16
    x0 = backbone.encode_images(_pixels())
    assert x0.dtype == torch.float32
    t = backbone.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
    out = backbone.predict(x0, t, backbone.build_condition(embeds))
    assert out.dtype == torch.float32 and out.shape == x0.shape


def test_missing_model_is_one_line_error_without_hanging(tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=r"is not a local diffusers pipeline directory .* Hub is offline"):
        load_backbone(tmp_path / "no_such_model")
    with pytest.raises(ModelNotFoundError, match=r"'someone/some-model' is not a local .* Hub is offline; pass"):
        load_backbone("someone/some-model")
    assert time.monotonic() - start < 2.0
    with pytest.raises(FileNotFoundError, match=r"no model_index.json"):  # ModelNotFoundError is a FileNotFoundError
        load_backbone(tmp_path)
    assert "\n" not in str(ModelNotFoundError)


def test_hub_ids_only_when_online(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_path("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(ModelNotFoundError, match=r"nor a Hub id like 'org/name'"):
        resolve_model_path(str(tmp_path / "missing" / "model"))


def test_unsupported_pipeline_class_lists_supported(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    with pytest.raises(
        ValueError, match=r"'PixArtAlphaPipeline'; supported pipeline classes are \['FluxPipeline', 'StableDiffusion3"
    ):
        load_backbone(tmp_path)


# ---- encoders ------------------------------------------------------------------------------------------------------
def test_encode_prompts_match_stock_pipeline(case, backbone):
    name, path = case
    embeds = backbone.encode_prompts(PROMPTS)
    assert {k: tuple(v.shape) for k, v in embeds.items()} == EMBED_SHAPES[name]
    assert not torch.allclose(embeds["prompt_embeds"][0], embeds["prompt_embeds"][1])

    pipe = CASES[name][2].from_pretrained(path)
    with torch.no_grad():  # CPU SDPA picks another kernel when weights require grad: same math, other rounding
        if name in ("sd", "sd_v"):
            expected = {"prompt_embeds": pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]}
        else:
            extra = [None, None] if name == "sd3" else []  # SD3 takes prompt_2, prompt_3 positionally
            out = pipe.encode_prompt(PROMPTS, *extra, device="cpu", do_classifier_free_guidance=False)
            expected = {"prompt_embeds": out[0], "pooled_prompt_embeds": out[2]}
    for key, value in expected.items():
        torch.testing.assert_close(embeds[key], value, rtol=0, atol=0)


@per_family
def test_unconditional_embeddings_follow_the_stock_pipeline(case, backbone):
    """CFG's unconditional input: SDXL zeros everything (`force_zeros_for_empty_prompt`, default True), SD and SD3
    encode "" — compared with what each stock pipeline's `encode_prompt` builds without a negative prompt."""
    name, path = case
    uncond = backbone.unconditional_embeddings()
    empty = backbone.encode_prompts([""])
    assert uncond.keys() == empty.keys()
    pipe = CASES[name][2].from_pretrained(path)
    with torch.no_grad():
        if name == "sd":
            expected = {"prompt_embeds": pipe.encode_prompt(["x"], "cpu", 1, True)[1]}
        else:
            extra = [None, None] if name == "sd3" else []
            out = pipe.encode_prompt(["x"], *extra, device="cpu", do_classifier_free_guidance=True)
            expected = {"prompt_embeds": out[1], "pooled_prompt_embeds": out[3]}
    for key, value in expected.items():
        torch.testing.assert_close(uncond[key], value, rtol=0, atol=0)
    if name == "sdxl":
        assert backbone.force_zeros_for_empty_prompt
        assert all(v.shape == empty[k].shape and not v.any() for k, v in uncond.items())
        assert empty["prompt_embeds"].abs().sum() > 0  # so "zeros" is a real difference from encoding ""
    else:
        assert not backbone.force_zeros_for_empty_prompt
        assert all(torch.equal(v, empty[k]) for k, v in uncond.items())


def test_sdxl_force_zeros_false_in_the_folder_encodes_empty(tiny_sdxl_path, tmp_path):
    """A model folder that sets `force_zeros_for_empty_prompt: false` (e.g. SDXL refiner-style configs) is honoured."""
    import json
    import shutil

    folder = shutil.copytree(tiny_sdxl_path, tmp_path / "sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (folder / "model_index.json").write_text(json.dumps(index))
    backbone = load_backbone(folder)
    assert not backbone.force_zeros_for_empty_prompt
    uncond, empty = backbone.unconditional_embeddings(), backbone.encode_prompts([""])
    assert all(torch.equal(v, empty[k]) for k, v in uncond.items())


def test_sd3_t5_tokens_and_zero_padding(tiny_sd3_path, tmp_path):
    with_t5 = load_backbone(tiny_sd3_path).encode_prompts(PROMPTS)["prompt_embeds"]
    assert with_t5[:, 16:].abs().sum() > 0  # T5 tokens
    assert with_t5[:, :16, 64:].abs().sum() == 0  # CLIP features (32 + 32) are zero-padded only past width 64: none

    path = make_tiny_sd3(tmp_path / "no_t5", with_t5=False)
    backbone = load_backbone(path)
    assert backbone.t5_encoder is None
    embeds = backbone.encode_prompts(PROMPTS)
    assert embeds["prompt_embeds"].shape == (2, 16 + 256, 64)
    assert embeds["prompt_embeds"][:, 16:].abs().sum() == 0  # zeros in place of T5, as diffusers does
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        expected = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds["prompt_embeds"], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], expected[2], rtol=0, atol=0)


@per_family
def test_encode_images_is_deterministic_posterior_mean(backbone):
    pixels = _pixels()
    latents = backbone.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    torch.testing.assert_close(backbone.encode_images(pixels), latents, rtol=0, atol=0)

    vae = backbone.vae
    shift = vae.config.shift_factor or 0.0
    mean = vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(latents, (mean - shift) * vae.config.scaling_factor)
    decoded = backbone.decode_latents(latents)
    torch.testing.assert_close(decoded, vae.decode(mean).sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    assert decoded.shape == pixels.shape


# ---- noising process -----------------------------------------------------------------------------------------------
def test_add_noise_matches_diffusers(case, backbone):
    x0, eps, t, x_t, _ = _noisy_batch(backbone)
    alpha, sigma = backbone.alpha_sigma(t)
    assert alpha.dtype == sigma.dtype == torch.float32 and alpha.shape == (2,)
    torch.testing.assert_close(x_t, alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps)
    if backbone.family == "sd3":
        torch.testing.assert_close(alpha + sigma, torch.ones(2))
        sched = copy.deepcopy(backbone.scheduler)
        grid = sched.timesteps[[0, 10, 500, 999]]  # σ·1000 on the scheduler's (shifted) training grid
        x0_4, eps_4 = x0[[0, 1, 0, 1]], eps[[0, 1, 1, 0]]
        torch.testing.assert_close(backbone.add_noise(x0_4, eps_4, grid), sched.scale_noise(x0_4, grid, eps_4))
    else:
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(2))
        ddpm = DDPMScheduler.from_pretrained(case[1], subfolder="scheduler")
        torch.testing.assert_close(x_t, ddpm.add_noise(x0, eps, t))


def test_pred_to_x0_eps_inverts_training_target(backbone):
    x0, eps, t, x_t, _ = _noisy_batch(backbone)
    target = backbone.training_target(x0, eps, t)
    x0_hat, eps_hat = backbone.pred_to_x0_eps(x_t, target, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)
    if backbone.prediction_type == "v_prediction":
        torch.testing.assert_close(target, backbone.noise_scheduler.get_velocity(x0, eps, t))
    elif backbone.prediction_type == "flow_matching":
        torch.testing.assert_close(target, eps - x0)
    else:
        torch.testing.assert_close(target, eps)


def test_vp_timesteps_uniform_integers(tiny_sd_path):
    backbone = load_backbone(tiny_sd_path)
    t = backbone.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert t.min() < 10 and t.max() > 990 and abs(t.float().mean().item() - 499.5) < 15
    torch.testing.assert_close(t, backbone.sample_timesteps(4000, generator=torch.Generator().manual_seed(0)))


def test_sd3_timesteps_logit_normal_with_shift(tiny_sd3_path):
    backbone = load_backbone(tiny_sd3_path)
    assert backbone.shift == 3.0 and backbone.timestep_sampling == "logit_normal"
    t = backbone.sample_timesteps(6, generator=torch.Generator().manual_seed(0))
    u = torch.sigmoid(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(t, 1000 * 3 * u / (1 + 2 * u))
    assert t.dtype == torch.float32
    # the shift moves mass to high noise: median σ = shift·0.5 / (1 + (shift−1)·0.5) = 0.75
    median = backbone.sample_timesteps(4000, generator=torch.Generator().manual_seed(1)).median().item()
    assert abs(median - 750) < 20

    backbone.timestep_sampling = "uniform"
    t = backbone.sample_timesteps(6, generator=torch.Generator().manual_seed(0))
    u = torch.rand(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, 1000 * 3 * u / (1 + 2 * u))
    backbone.timestep_sampling = "mode"
    with pytest.raises(ValueError, match=r"`timestep_sampling` must be one of \['logit_normal', 'uniform'\]"):
        backbone.sample_timesteps(2)


def test_sdxl_time_ids(tiny_sdxl_path):
    backbone = load_backbone(tiny_sdxl_path)
    embeds = backbone.encode_prompts(PROMPTS)
    cond = backbone.build_condition(
        embeds, original_size=torch.tensor([[100, 200], [300, 400]]), crop_top_left=torch.tensor([[1, 2], [3, 4]]),
        target_size=(16, 16),
    )  # fmt: skip
    expected = torch.tensor([[100, 200, 1, 2, 16, 16], [300, 400, 3, 4, 16, 16]], dtype=torch.float32)
    torch.testing.assert_close(cond["time_ids"], expected)
    assert set(embeds) == {"prompt_embeds", "pooled_prompt_embeds"}  # input not modified

    default = backbone.build_condition(embeds)["time_ids"]
    torch.testing.assert_close(default, torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))
    pipe = backbone.make_pipeline()
    stock = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(default, stock.expand(2, 6))
    with pytest.raises(ValueError, match=r"must be `\(h, w\)` or `\[2, 2\]`, got shape \(3, 2\)"):
        backbone.build_condition(embeds, original_size=torch.zeros(3, 2))

    # micro-conditioning reaches the UNet; without time ids, predict uses the latent size in pixels and no crop
    x0, eps, t, x_t, _ = _noisy_batch(backbone)
    out_default = backbone.predict(x_t, t, backbone.build_condition(embeds))
    torch.testing.assert_close(backbone.predict(x_t, t, embeds), out_default)
    assert not torch.allclose(backbone.predict(x_t, t, cond), out_default)


# ---- the network ---------------------------------------------------------------------------------------------------
@per_family
def test_predict_and_reference_override(backbone):
    _, _, t, x_t, cond = _noisy_batch(backbone)
    out = backbone.predict(x_t, t, cond)
    assert out.shape == x_t.shape and out.dtype == torch.float32
    reference = copy.deepcopy(backbone.denoiser)
    torch.testing.assert_close(backbone.predict(x_t, t, cond, denoiser=reference), out)
    with torch.no_grad():  # the override is really used
        next(reference.parameters()).add_(1.0)
    assert not torch.allclose(backbone.predict(x_t, t, cond, denoiser=reference), out)
    # a half-precision frozen copy gets its inputs cast; output returns as float32 and stays close
    half = copy.deepcopy(backbone.denoiser).to(torch.bfloat16)
    out_half = backbone.predict(x_t, t, cond, denoiser=half)
    assert out_half.dtype == torch.float32
    assert (out_half - out).abs().max() < 0.05 * out.abs().max() + 0.05


@per_family
def test_lora_only_lora_trains(backbone):
    backbone.add_lora(rank=4)
    _, _, t, x_t, cond = _noisy_batch(backbone)
    backbone.predict(x_t, t, cond).pow(2).mean().backward()
    named = dict(backbone.denoiser.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert lora and {n for n, p in named.items() if p.requires_grad} == lora
    assert all(named[n].grad is not None for n in lora if "lora_A" in n or "lora_B" in n)
    assert not any(p.grad is not None for n, p in named.items() if n not in lora)


@per_family
def test_save_full_reloads_with_diffusers(case, backbone, tmp_path):
    _, _, t, x_t, cond = _noisy_batch(backbone)
    with torch.no_grad():
        for p in backbone.denoiser.parameters():  # make it differ from the tiny folder's weights
            p.add_(0.01 * torch.randn_like(p))
    folder = backbone.save_full(tmp_path)
    assert folder == tmp_path / backbone.denoiser_subfolder
    reloaded = CASES[case[0]][4].from_pretrained(folder)
    torch.testing.assert_close(
        backbone.predict(x_t, t, cond, denoiser=reloaded), backbone.predict(x_t, t, cond), rtol=0, atol=0
    )


def _images(pipe, prompt="a red circle"):
    # guidance 1 = no CFG batch: half the compute, same code path for the denoiser
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, generator=generator, output_type="np")
    return torch.from_numpy(out.images)


@per_family
def test_lora_loads_into_stock_pipeline(case, backbone, tmp_path):
    name, path = case
    stock = CASES[name][2].from_pretrained(path)
    stock.set_progress_bar_config(disable=True)
    base = _images(stock)
    torch.testing.assert_close(_images(backbone.make_pipeline()), base, rtol=0, atol=1e-6)

    backbone.add_lora(rank=4, alpha=8)  # alpha ≠ rank: the scale must travel with the file
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in backbone.denoiser.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    adapted = _images(backbone.make_pipeline())

    file = backbone.save_lora(tmp_path / "lora")
    assert file == tmp_path / "lora" / "pytorch_lora_weights.safetensors" and file.is_file()
    stock.load_lora_weights(tmp_path / "lora")
    with_lora = _images(stock)
    assert (with_lora - base).abs().mean() > 1e-3
    torch.testing.assert_close(with_lora, adapted, rtol=0, atol=1e-5)


# ---- attention -----------------------------------------------------------------------------------------------------
def test_resolve_attention(monkeypatch, caplog):
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
    assert resolve_attention("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match=r"`attention` must be one of \['sdpa', 'xformers', 'eager'\], got 'flash'"):
        resolve_attention("flash", "cpu")

    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails
    with caplog.at_level("WARNING"):
        assert resolve_attention("xformers", torch.device("cuda")) == "sdpa"
    assert "`xformers` package is not installed" in caplog.text

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))  # importable
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resolve_attention("xformers", torch.device("cpu")) == "sdpa"
    assert "needs a CUDA device, got 'cpu'" in caplog.text
    assert resolve_attention("xformers", torch.device("cuda", 0)) == "xformers"


def test_apply_attention_sdpa_eager_agree(tiny_sd_path, tiny_sd3_path, caplog):
    backbone = load_backbone(tiny_sd_path)
    _, _, t, x_t, cond = _noisy_batch(backbone)
    assert backbone.set_attention("xformers") == "sdpa"  # CPU fallback
    assert {type(p) for p in backbone.denoiser.attn_processors.values()} == {AttnProcessor2_0}
    out_sdpa = backbone.predict(x_t, t, cond)
    apply_attention(backbone.denoiser, "eager")
    assert {type(p) for p in backbone.denoiser.attn_processors.values()} == {AttnProcessor}
    torch.testing.assert_close(backbone.predict(x_t, t, cond), out_sdpa, rtol=1e-4, atol=1e-5)

    sd3 = load_backbone(tiny_sd3_path)
    with caplog.at_level("WARNING"):
        assert sd3.set_attention("eager") == "eager"
    assert "no eager joint-attention processor" in caplog.text
    assert {type(p) for p in sd3.denoiser.attn_processors.values()} == {JointAttnProcessor2_0}
    with pytest.raises(ValueError, match=r"must be one of"):
        apply_attention(sd3.denoiser, "flash")
