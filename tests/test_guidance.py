"""Negative-adapter CFG in stock pipelines: δ = 0 reproduces plain CFG bit for bit; a known δ equals a hand-written
two-network CFG (per denoiser call, and a whole sampling loop with a scheduler that scales its inputs); α/β with a
LoRA or dense η; guidance ≤ 1 is a no-op; `remove()` restores the pipeline; errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors.torch import save_file

from diffalign.backbones import load_backbone
from diffalign.guidance import attach_negative_adapter, dense_negative_weights

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}
PROMPTS = ["a red circle", "a blue square on a green background"]
KW = dict(num_inference_steps=3, output_type="latent", height=16, width=16)


def _pipe(family, request):
    pipe = PIPELINES[family].from_pretrained(request.getfixturevalue(f"tiny_{family}_path"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(path, out, scale: float, seed: int = 0):
    """A LoRA δ in the trainers' output format (rank 4 on the attention projections); lora_B ~ scale·N(0, 1)."""
    backbone = load_backbone(path)
    backbone.add_lora(4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    backbone.save_lora(out)
    return out


def _run(pipe, guidance_scale=5.0, seed=1, **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, generator=gens, guidance_scale=guidance_scale, **{**KW, **kw}).images


def _negative_net(pipe, lora_dir, beta):
    """The 'second network' of the reference implementation: a copy of the denoiser with β·δ loaded."""
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    net = copy.deepcopy(getattr(pipe, name))
    state, *_ = type(pipe).lora_state_dict(str(lora_dir), return_lora_metadata=True)
    net.load_lora_adapter(state, prefix=name, adapter_name="neg")
    net.set_adapters(["neg"], [beta])
    return net


def _record_calls(module):
    calls = []

    def hook(mod, args, kwargs, out):
        calls.append((args, dict(kwargs), out[0] if isinstance(out, tuple) else out.sample))

    return calls, module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_zero_delta_reproduces_plain_cfg_exactly(family, request, tmp_path):
    pipe = _pipe(family, request)
    plain = _run(pipe)
    path = request.getfixturevalue(f"tiny_{family}_path")
    handle = attach_negative_adapter(pipe, _lora(path, tmp_path / "zero", scale=0.0), beta=3.0)
    assert torch.equal(_run(pipe), plain)
    handle.remove()


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_known_delta_matches_two_network_cfg_per_call(family, request, tmp_path):
    """Every stacked [uncond, cond] denoiser call returns [ε_neg(uncond half), ε_pos(cond half)]."""
    pipe = _pipe(family, request)
    lora = _lora(request.getfixturevalue(f"tiny_{family}_path"), tmp_path / "delta", scale=0.2)
    beta = 0.7
    negative, positive = _negative_net(pipe, lora, beta), copy.deepcopy(pipe.components[_name(pipe)])
    plain = _run(pipe)
    handle = attach_negative_adapter(pipe, lora, beta=beta)
    denoiser = getattr(pipe, _name(pipe))
    calls, hook = _record_calls(denoiser)
    guided = _run(pipe, negative_prompt=["a black star"] * 2)
    hook.remove()
    assert len(calls) == KW["num_inference_steps"]
    assert (guided - plain).abs().max() > 1e-3  # δ changes the samples
    for args, kwargs, out in calls:
        x = args[0] if args else kwargs.pop("hidden_states")
        with torch.no_grad():
            expect_neg = _call(negative, (x[:2], _half(args[1:], kwargs, 0)))
            expect_pos = _call(positive, (x, (args[1:], kwargs)))[2:]  # the plain stacked call's cond half
        torch.testing.assert_close(out[:2], expect_neg, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[2:], expect_pos)  # one stacked call: the cond half is bit-identical to plain CFG
    handle.remove()


def _name(pipe):
    return "unet" if hasattr(pipe, "unet") else "transformer"


def _half(args, kwargs, i):
    def part(v):
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == 4:
            return v[:2] if i == 0 else v[2:]
        if isinstance(v, dict):
            return {k: part(w) for k, w in v.items()}
        return v

    return tuple(part(a) for a in args), {k: part(v) for k, v in kwargs.items()}


def _call(net, half):
    x, (args, kwargs) = half
    if args:
        return net(x, *args, **kwargs)[0]
    return net(hidden_states=x, **kwargs)[0]


def test_full_loop_equals_hand_written_two_network_cfg_with_euler(tiny_sd_path, tmp_path):
    """SD + Euler (whose `scale_model_input` divides by sqrt(σ² + 1)): the attached stock pipeline equals a
    hand-written loop that scales the input of BOTH networks."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    lora, beta, scale, steps = _lora(tiny_sd_path, tmp_path / "delta", scale=0.2), 1.5, 6.0, 4
    negative = _negative_net(pipe, lora, beta)
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps_neg = negative(x_in, t, encoder_hidden_states=uncond).sample
            eps_pos = pipe.unet(x_in, t, encoder_hidden_states=cond).sample
            x = scheduler.step(eps_neg + scale * (eps_pos - eps_neg), t, x).prev_sample

    handle = attach_negative_adapter(pipe, lora, beta=beta)
    out = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=latents.clone(),
        guidance_scale=scale,
        num_inference_steps=steps,
        output_type="latent",
    ).images
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-5)
    handle.remove()


def test_guidance_scale_at_most_one_is_a_no_op(tiny_sd_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe, guidance_scale=1.0)
    handle = attach_negative_adapter(pipe, _lora(tiny_sd_path, tmp_path / "d", scale=0.3), beta=2.0)
    assert torch.equal(_run(pipe, guidance_scale=1.0), plain)
    assert not torch.equal(_run(pipe, guidance_scale=4.0), _run(pipe, guidance_scale=1.0))
    handle.remove()


def test_negative_weights_applies_theta_neg_to_every_row_after_a_guided_call(tiny_sd_path, tmp_path):
    """A guided pipeline call leaves `do_classifier_free_guidance` True; a direct even-batch call inside
    `negative_weights()` must still be θ_neg on BOTH rows, not read as a stacked [uncond, cond] call."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    lora, beta = _lora(tiny_sd_path, tmp_path / "d", scale=0.3), 0.8
    negative = _negative_net(pipe, lora, beta)
    handle = attach_negative_adapter(pipe, lora, beta=beta)
    _run(pipe)  # guided: leaves the pipeline's guidance state behind
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = negative(x, 10, encoder_hidden_states=text).sample
        with handle.negative_weights():
            got = pipe.unet(x, 10, encoder_hidden_states=text).sample
        stacked = pipe.unet(x, 10, encoder_hidden_states=text).sample  # outside: row 0 θ_neg, row 1 θ_pipe
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked[:1], expect[:1], rtol=1e-5, atol=1e-5)
    assert (stacked[1:] - expect[1:]).abs().max() > 1e-4
    handle.remove()


def test_remove_restores_the_pipeline_and_attach_twice_is_refused(tiny_sd_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    grads = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    plain = _run(pipe)
    lora = _lora(tiny_sd_path, tmp_path / "d", scale=0.3)
    handle = attach_negative_adapter(pipe, lora)
    with pytest.raises(ValueError, match="already attached"):
        attach_negative_adapter(pipe, lora)
    assert not torch.equal(_run(pipe), plain)
    handle.remove()
    handle.remove()  # idempotent
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads
    assert "forward" not in pipe.unet.__dict__
    assert torch.equal(_run(pipe), plain)
    attach_negative_adapter(pipe, lora).remove()  # attachable again


def test_alpha_scales_a_lora_eta_without_base(tiny_sd_path, tmp_path):
    """Pipeline = base + η (η a loaded LoRA): α = 0 and δ = 0 → the uncond branch is the BASE; the cond branch keeps
    η; `remove()` restores η's scale and the active adapters."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    base = copy.deepcopy(pipe.unet)
    pipe.load_lora_weights(str(_lora(tiny_sd_path, tmp_path / "eta", scale=0.3, seed=7)), adapter_name="dpo")
    positive = copy.deepcopy(pipe.unet)
    plain = _run(pipe)
    handle = attach_negative_adapter(pipe, _lora(tiny_sd_path, tmp_path / "zero", scale=0.0), alpha=0.0)
    calls, hook = _record_calls(pipe.unet)
    _run(pipe)
    hook.remove()
    args, kwargs, out = calls[0]
    x, t, text = args[0], args[1], kwargs["encoder_hidden_states"]
    with torch.no_grad():
        torch.testing.assert_close(out[:2], base(x[:2], t, encoder_hidden_states=text[:2]).sample)
        torch.testing.assert_close(out[2:], positive(x[2:], t, encoder_hidden_states=text[2:]).sample)
    handle.remove()
    assert pipe.unet.active_adapters() == ["dpo"]
    assert torch.equal(_run(pipe), plain)


def test_alpha_with_dense_eta_needs_base(tiny_sd_path, tmp_path):
    """A dense fine-tune η: θ_neg = θ_pipe − (1 − α)·(θ_pipe − θ_base) + β·δ, with δ a dense offset file."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    base_sd = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the "community fine-tune": every conv_in / time-embedding weight moved
        for name, p in pipe.unet.named_parameters():
            if name.startswith(("conv_in", "time_embedding")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    delta = {"conv_out.weight": 0.1 * torch.randn(pipe.unet.conv_out.weight.shape, generator=gen)}
    save_file(delta, str(tmp_path / "negative_offset.safetensors"))
    with pytest.raises(ValueError, match="needs `base`"):
        attach_negative_adapter(pipe, tmp_path, alpha=0.5)
    alpha, beta = 0.5, 2.0
    expected = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, p in expected.named_parameters():
            p.copy_(p - (1 - alpha) * (p - base_sd[name]) + beta * delta.get(name, torch.zeros_like(p)))
    pipe_sd = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    handle = attach_negative_adapter(pipe, tmp_path, alpha=alpha, beta=beta, base=base_sd)
    assert len(handle.dense) == 1 + sum(n.startswith(("conv_in", "time_embedding")) for n in base_sd)
    calls, hook = _record_calls(pipe.unet)
    _run(pipe)
    hook.remove()
    args, kwargs, out = calls[-1]
    with torch.no_grad():
        ref = expected(args[0][:2], args[1], encoder_hidden_states=kwargs["encoder_hidden_states"][:2]).sample
    torch.testing.assert_close(out[:2], ref, rtol=1e-5, atol=1e-6)
    handle.remove()
    assert all(torch.equal(v, pipe_sd[k]) for k, v in pipe.unet.state_dict().items())


def test_dense_negative_weights_formula():
    params = {"w": torch.nn.Parameter(torch.tensor([2.0, 4.0])), "u": torch.nn.Parameter(torch.tensor([1.0]))}
    base = {"w": torch.tensor([1.0, 1.0]), "u": torch.tensor([1.0])}
    delta = {"u": torch.tensor([0.5])}
    out = dense_negative_weights(params, alpha=0.25, beta=2.0, base=base, delta=delta)
    # w: θ − 0.75·(θ − base) = [1.25, 1.75]; u: η = 0, so θ + 2·0.5 = 2
    assert torch.equal(out["w"], torch.tensor([1.25, 1.75])) and torch.equal(out["u"], torch.tensor([2.0]))
    assert dense_negative_weights(params, alpha=1.0, beta=1.0, base=base, delta=None) == {}
    with pytest.raises(KeyError, match="does not have"):
        dense_negative_weights(params, 1.0, 1.0, None, {"nope": torch.zeros(1)})


def test_errors(tiny_sd_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attach_negative_adapter(pipe, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds neither"):
        attach_negative_adapter(pipe, tmp_path)
    with pytest.raises(ValueError, match="`beta` must be a finite number"):
        attach_negative_adapter(pipe, tmp_path, beta=float("nan"))
    with pytest.raises(ValueError, match="has no `unet` or `transformer`"):
        attach_negative_adapter(object(), tmp_path)


# ---- wiring: `diffalign generate`, `diffalign eval` ---------------------------------------------------------------
def test_cli_generate_with_negative_adapter(tiny_sd_path, tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    lora = _lora(tiny_sd_path, tmp_path / "delta", scale=0.3)
    common = ["generate", "--model", str(tiny_sd_path), "--prompt", "a red circle", "--prompt", "a blue star"]
    common += ["--seeds", "0,1", "--steps", "2", "--resolution", "16", "--guidance-scale", "4"]
    plain = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "plain")])
    negative = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "neg"), "--negative-adapter", str(lora)])
    assert plain.exit_code == 0 and negative.exit_code == 0, negative.output
    assert "4 images" in negative.output
    a, b = (np.asarray(Image.open(tmp_path / d / "seed1" / "00001.png")) for d in ("plain", "neg"))
    assert a.shape == (16, 16, 3) and not np.array_equal(a, b)
    both = CliRunner().invoke(app, ["generate", "--model", str(tiny_sd_path)])
    assert both.exit_code != 0 and "either `--prompt`" in str(both.exception)


def test_eval_compares_plain_cfg_with_negative_adapter(tiny_sd_path, tmp_path):
    from diffalign import rewards
    from diffalign.config import ConfigError, build_config
    from diffalign.evaluation import EvalConfig, run_eval

    class Brightness(rewards.Reward):
        def score_batch(self, images, prompts):
            return torch.stack([im.mean() for im in images])

    rewards.register("test_npo_brightness")(lambda **kw: Brightness(device="cpu", batch_size=16))
    try:
        (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
        lora = str(_lora(tiny_sd_path, tmp_path / "delta", scale=0.3))
        models = {
            "cfg": {"model": str(tiny_sd_path)},
            "cfg+neg": {"model": str(tiny_sd_path), "negative_adapter": lora},
        }
        settings = dict(
            baseline="cfg",
            prompts=str(tmp_path / "prompts.txt"),
            rewards=["test_npo_brightness"],
            seeds=[0, 1],
            num_inference_steps=2,
            guidance_scale=4.0,
            resolution=16,
            grid_prompts=0,
            out=str(tmp_path / "eval"),
        )
        results = run_eval(build_config(EvalConfig, {"models": models, **settings}))
        assert list(results["win_rates"]) == ["cfg+neg vs cfg"]
        assert results["win_rates"]["cfg+neg vs cfg"]["test_npo_brightness"]["n"] == 4
        cfg_mean = results["models"]["cfg"]["test_npo_brightness"]["mean"]
        assert results["models"]["cfg+neg"]["test_npo_brightness"]["mean"] != pytest.approx(cfg_mean, abs=1e-6)
        missing = {"cfg": {"model": str(tiny_sd_path), "negative_adapter": str(tmp_path / "nope")}}
        with pytest.raises(ConfigError, match="`models.cfg.negative_adapter` .* does not exist"):
            run_eval(build_config(EvalConfig, {"models": missing, **settings}))
    finally:
        rewards.registry._REGISTRY.pop("test_npo_brightness")
