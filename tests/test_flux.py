"""FLUX.1 backbone on tiny dev (guidance-distilled) and schnell pipelines: encoders and packing against the stock
`FluxPipeline`, the σ sampling of the diffusers FLUX training script, the velocity prediction checked against one
stock sampling step, every method's first loss, the refusals on guidance-distilled models, and the trained LoRA in
stock diffusers and as a kohya/ComfyUI file."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from typer.testing import CliRunner

import scale_cases
from diffalign.backbones import FluxBackbone, detect_family, load_backbone
from diffalign.backbones.flux import GuidanceDistilledError
from diffalign.cli import app
from diffalign.trainers import get_trainer
from tiny_models import make_tiny_flux

PROMPTS = ["a red circle on blue background", ""]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dev_path(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("flux_dev"))


@pytest.fixture(scope="module")
def schnell_path(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("flux_schnell"), guidance_embeds=False, dynamic_shift=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return scale_cases.write_data(tmp_path_factory.mktemp("flux_data"))


@pytest.fixture
def dev(dev_path):
    return load_backbone(dev_path)


def _pipe(path):
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- loading, encoders, VAE, packing -------------------------------------------------------------------------------
def test_load_detects_flux_dev_and_schnell(dev_path, schnell_path):
    dev, schnell = load_backbone(dev_path), load_backbone(schnell_path)
    for b in (dev, schnell):
        assert type(b) is FluxBackbone and b.family == "flux" and b.prediction_type == "flow_matching"
        assert isinstance(b.denoiser, FluxTransformer2DModel) and b.latent_channels == 16
        assert b.num_train_timesteps == 1000 and b.max_sequence_length == 512
    assert detect_family(dev_path) == "flux"
    assert dev.guidance_embeds and dev.dynamic_shift and dev.guidance_scale == 3.5
    assert not schnell.guidance_embeds and not schnell.dynamic_shift and schnell.shift == 1.0


def test_encode_prompts_match_stock_pipeline(dev, dev_path):
    embeds = dev.encode_prompts(PROMPTS)
    assert {k: tuple(v.shape) for k, v in embeds.items()} == {
        "prompt_embeds": (2, 512, 32),  # T5 tokens padded to max_sequence_length, T5 width
        "pooled_prompt_embeds": (2, 32),  # CLIP pooled output, no projection
    }
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = _pipe(dev_path).encode_prompt(PROMPTS, None, device="cpu")
    torch.testing.assert_close(embeds["prompt_embeds"], prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    _, txt_ids = dev.position_ids(8, 8, 512, "cpu", torch.float32)
    torch.testing.assert_close(txt_ids, text_ids, rtol=0, atol=0)


def test_vae_uses_shift_and_scaling_factors(dev):
    latents = dev.encode_images(_pixels())
    assert latents.shape == (2, 16, 8, 8)
    vae = dev.vae
    mean = vae.encode(_pixels()).latent_dist.mean
    torch.testing.assert_close(latents, (mean - 0.1) * 1.5)  # the tiny VAE's shift_factor 0.1, scaling_factor 1.5
    torch.testing.assert_close(dev.decode_latents(latents), vae.decode(mean).sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_pack_unpack_round_trip_and_position_ids(dev):
    x = torch.randn(3, 16, 8, 6)
    tokens = dev.pack(x)
    assert tokens.shape == (3, 4 * 3, 64)
    torch.testing.assert_close(dev.unpack(tokens, 8, 6), x, rtol=0, atol=0)
    # token (row i, col j) holds the 2x2 patch x[:, :, 2i:2i+2, 2j:2j+2], channel-major
    torch.testing.assert_close(tokens[:, 1 * 3 + 2].view(3, 16, 2, 2), x[:, :, 2:4, 4:6], rtol=0, atol=0)
    img_ids, _ = dev.position_ids(8, 6, 4, "cpu", torch.float32)
    assert img_ids.shape == (12, 3) and img_ids[1 * 3 + 2].tolist() == [0.0, 1.0, 2.0]


# ---- noising process -----------------------------------------------------------------------------------------------
def test_timesteps_follow_the_diffusers_flux_script(dev, schnell_path):
    u = torch.sigmoid(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    # dev: use_dynamic_shifting → the script's training sigmas are unshifted, σ = u
    torch.testing.assert_close(dev.sample_timesteps(6, torch.Generator().manual_seed(0)), 1000 * u)
    schnell = load_backbone(schnell_path)
    torch.testing.assert_close(schnell.sample_timesteps(6, torch.Generator().manual_seed(0)), 1000 * u)
    schnell.shift = 3.0  # a static shift is applied as the scheduler applies it to its training sigmas
    torch.testing.assert_close(
        schnell.sample_timesteps(6, torch.Generator().manual_seed(0)), 1000 * 3 * u / (1 + 2 * u)
    )
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = sched.sigmas[[0, 500, 999]]  # the scheduler's own shifted training sigmas at u = 1, 0.5, 0.001
    torch.testing.assert_close(schnell.shift_sigma(torch.tensor([1.0, 0.5, 0.001])), grid)

    dev.image_seq_len = 4096  # the pipeline's resolution shift for 1024² (μ = max_shift)
    assert dev.shift_mu(4096) == pytest.approx(1.15)
    expected = dev.scheduler.time_shift(1.15, 1.0, u)
    torch.testing.assert_close(dev.sample_timesteps(6, torch.Generator().manual_seed(0)), 1000 * expected)
    dev.timestep_sampling = "mode"
    with pytest.raises(ValueError, match=r"`timestep_sampling` must be one of \['logit_normal', 'uniform'\]"):
        dev.sample_timesteps(2)


def test_sampling_sigmas_are_the_pipeline_grid(dev, dev_path):
    pipe = _pipe(dev_path)
    seen = []
    pipe(PROMPTS[0], height=16, width=16, num_inference_steps=3, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(p.scheduler.sigmas.clone()) or {})  # fmt: skip
    torch.testing.assert_close(dev.sampling_sigmas(3, resolution=16), seen[0])
    with pytest.raises(ValueError, match="pass `resolution`"):
        dev.sampling_sigmas(3)


# ---- the network ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_predict_is_the_velocity_of_one_stock_euler_step(variant, dev_path, schnell_path):
    """One `FluxPipeline` step from σ = 1 to 0 is x ← x − v(x, σ=1): `predict` must give that v (guidance 3.5 on
    dev, none on schnell)."""
    path = dev_path if variant == "dev" else schnell_path
    backbone, pipe = load_backbone(path), _pipe(path)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe(PROMPTS[0], height=16, width=16, num_inference_steps=1, guidance_scale=3.5,
                   latents=backbone.pack(x), output_type="latent").images  # fmt: skip
    v_stock = backbone.unpack(backbone.pack(x) - out, 8, 8)
    v = backbone.predict(x, torch.tensor([1000.0]), backbone.encode_prompts(PROMPTS[:1]))
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, v_stock, rtol=1e-5, atol=1e-5)
    if variant == "dev":  # the guidance value is an input of the network
        backbone.guidance_scale = 1.0
        assert not torch.allclose(backbone.predict(x, torch.tensor([1000.0]), backbone.encode_prompts(PROMPTS[:1])), v)


# ---- methods -------------------------------------------------------------------------------------------------------
FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5, "smpo": math.log(2), "tdpo": math.log(2), "tkto": 0.5}
"""At step 1 the policy is the reference (LoRA B = 0): DPO-family margins are 0 → log 2; KTO's 1 − σ(0) = 0.5."""


@pytest.mark.parametrize("method", list(FIRST_LOSS))
def test_first_loss_at_policy_equals_reference(method, dev_path, data, tmp_path):
    cls = get_trainer(method)
    cls(scale_cases.config(method, dev_path, data[method], tmp_path, batch_size=2, ga=1, lora_rank=4)).train()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(FIRST_LOSS[method], abs=1e-6)


@pytest.mark.parametrize("method", ["npo", "self-npo"])
def test_negative_methods_refused_on_guidance_distilled_dev(method, dev_path, data, tmp_path):
    cls = get_trainer(method)
    with pytest.raises(GuidanceDistilledError, match=rf"`train {method}` .* guidance-distilled"):
        cls(scale_cases.config(method, dev_path, data[method], tmp_path, batch_size=2, ga=1)).train()
    with pytest.raises(GuidanceDistilledError, match="no unconditional prediction"):
        load_backbone(dev_path).unconditional_embeddings()
    from diffalign.guidance import attach_negative_adapter

    with pytest.raises(ValueError, match=r"FluxPipeline is guidance-distilled .* no unconditional branch"):
        attach_negative_adapter(_pipe(dev_path), {})


@pytest.mark.parametrize("method", ["npo", "self-npo"])
def test_negative_methods_run_on_schnell(method, schnell_path, data, tmp_path):
    cls = get_trainer(method)
    cls(scale_cases.config(method, schnell_path, data[method], tmp_path, batch_size=2, ga=1, lora_rank=4)).train()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(first["loss"])
    if method == "npo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    from diffalign.guidance import attach_negative_adapter

    # FluxPipeline's true CFG makes two separate calls: nothing to hook, refused rather than silently ignored
    with pytest.raises(ValueError, match=r"FluxPipeline does not stack \[uncond, cond\]"):
        attach_negative_adapter(_pipe(schnell_path), tmp_path / "final")


# ---- outputs -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_run(dev_path, data, tmp_path_factory):
    """`diffalign train dpo` on tiny FLUX-dev, LoRA rank 4 / α 8, 2 steps with a large LR (the adapter must move)."""
    out = tmp_path_factory.mktemp("flux_dpo")
    args = ["train", "dpo", "--model", str(dev_path), "--data", data["dpo"], "--output_dir", str(out)]
    args += ["--resolution", "16", "--batch_size", "2", "--max_steps", "2", "--lora_rank", "4", "--lora_alpha", "8"]
    args += ["--learning_rate", "0.05", "--beta", "50", "--checkpointing_steps", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _trained_backbone(dev_path, run):
    """diffalign's own forward with the trained adapter: the backbone, LoRA attached, weights from the run's file."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    backbone = load_backbone(dev_path)
    backbone.add_lora(rank=4, alpha=8)
    state = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    state = convert_unet_state_dict_to_peft({k.removeprefix("transformer."): v for k, v in state.items()})
    assert not set_peft_model_state_dict(backbone.denoiser, state).unexpected_keys
    return backbone


def _images(pipe):
    gen = torch.Generator().manual_seed(0)
    out = pipe(PROMPTS[0], height=16, width=16, num_inference_steps=2, guidance_scale=3.5, generator=gen,
               output_type="np")  # fmt: skip
    return torch.from_numpy(out.images)


def test_trained_lora_loads_in_stock_flux_pipeline(dev_path, dpo_run):
    backbone = _trained_backbone(dev_path, dpo_run)
    stock = _pipe(dev_path)
    base = _images(stock)
    stock.load_lora_weights(dpo_run / "final")
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([700.0, 200.0]), backbone.encode_prompts(PROMPTS)
    ours = backbone.predict(x, t, cond)
    with torch.no_grad():
        theirs = backbone.predict(x, t, cond, denoiser=stock.transformer)
        reference = backbone.predict(x, t, cond, denoiser=_pipe(dev_path).transformer)
    assert (ours - reference).abs().max() > 1e-3  # the adapter really changes the output
    assert (ours - theirs).abs().max() <= 1e-6  # measured: 0 (same kernels, same weights)
    with_lora = _images(stock)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, _images(backbone.make_pipeline()), rtol=0, atol=1e-6)


# The diffusers FLUX modules ComfyUI maps onto its BFL weights (comfy/utils.py `flux_to_diffusers`, read for the
# names only); comfy/lora.py `model_lora_keys_unet` accepts `lora_transformer_` + each of them with `.` → `_`.
COMFY_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")  # fmt: skip
COMFY_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")


def _comfy_names(double: int, single: int) -> set[str]:
    modules = [f"transformer_blocks.{i}.{m}" for i in range(double) for m in COMFY_DOUBLE]
    modules += [f"single_transformer_blocks.{i}.{m}" for i in range(single) for m in COMFY_SINGLE]
    return {"lora_transformer_" + m.replace(".", "_") for m in modules}


def test_kohya_export_names_flux_modules_and_loads_back(dev_path, dpo_run, tmp_path):
    out = tmp_path / "flux_kohya.safetensors"
    result = CliRunner().invoke(app, ["export", str(dpo_run), "--format", "kohya", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight" in keys
    assert "lora_transformer_single_transformer_blocks_0_attn_to_k.lora_up.weight" in keys
    assert "lora_transformer_transformer_blocks_0_attn_to_out_0.alpha" in keys
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(modules) == 3 * 1 + 4 * 1  # q, k, v of the single block; q, k, v, to_out.0 of the double block
    assert modules <= _comfy_names(double=1, single=1)  # every exported module has a ComfyUI target
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"

    fp32 = tmp_path / "flux_kohya_fp32.safetensors"
    result = CliRunner().invoke(
        app, ["export", str(dpo_run), "--format", "kohya", "--out", str(fp32), "--dtype", "fp32"]
    )
    assert result.exit_code == 0, result.output

    backbone = load_backbone(dev_path)
    x, t, cond = torch.randn(1, 16, 8, 8), torch.tensor([500.0]), backbone.encode_prompts(PROMPTS[:1])

    def velocity(lora) -> torch.Tensor:
        pipe = _pipe(dev_path)
        pipe.load_lora_weights(lora)  # kohya files go through diffusers' kohya → diffusers FLUX converter
        with torch.no_grad():
            return backbone.predict(x, t, cond, denoiser=pipe.transformer)

    native = velocity(dpo_run / "final")
    assert (velocity(str(fp32)) - native).abs().max() <= 1e-6  # measured: 0
    assert (velocity(str(out)) - native).abs().max() < 1e-3  # fp16 file; measured 7.7e-5


def test_lora_and_diffusers_exports_of_a_flux_run(dev_path, dpo_run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(dpo_run), "--format", "lora", "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / "lora_kohya.safetensors").is_file()
    assert "FluxPipeline.from_pretrained" in (tmp_path / "lora" / "README.md").read_text()

    result = CliRunner().invoke(
        app, ["export", str(dpo_run), "--format", "diffusers", "--out", str(tmp_path / "full")]
    )
    assert result.exit_code == 0, result.output
    fused, native = _pipe(tmp_path / "full"), _pipe(dev_path)
    native.load_lora_weights(dpo_run / "final")
    torch.testing.assert_close(_images(fused), _images(native), rtol=0, atol=1e-5)


def test_flux_preset_trains_a_step(dev_path, data, tmp_path):
    args = ["train", "dpo", "--config", "flux_dpo_lora", "--model", str(dev_path), "--data", data["dpo"]]
    args += ["--output_dir", str(tmp_path), "--resolution", "16", "--batch_size", "2", "--gradient_accumulation_steps"]
    args += ["1", "--max_steps", "1", "--mixed_precision", "no", "--optimizer", "adamw"]  # gradient checkpointing on
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / "final" / "config.yaml").read_text())
    assert cfg["proportion_empty_prompts"] == 0.0 and cfg["validation_guidance_scale"] == 3.5 and cfg["beta"] == 5000
    assert cfg["gradient_checkpointing"] is True


def test_the_lowvram_flux_preset_trains_on_an_nf4_base(dev_path, data, tmp_path):
    """flux_dpo_lowvram's combination (nf4 base, cached embeddings with T5 released, checkpointing, batch 1 +
    accumulation) on the tiny FLUX-dev; only the size keys are overridden."""
    args = ["train", "dpo", "--config", "flux_dpo_lowvram", "--model", str(dev_path), "--data", data["dpo"]]
    args += ["--output_dir", str(tmp_path), "--resolution", "16", "--gradient_accumulation_steps", "2"]
    args += ["--max_steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / "final" / "config.yaml").read_text())
    assert cfg["base_quantization"] == "nf4" and cfg["offload_text_encoders"] is True
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
