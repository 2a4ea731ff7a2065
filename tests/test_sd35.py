"""SD3.5 on the SD3 backbone: tiny medium (MMDiT-X dual attention + RMS q/k norm) and large (RMS q/k norm) layouts
load, predict like the stock pipeline, start every method at its policy == reference loss, and a LoRA trained by
`diffalign train dpo` gives the same images in a stock `StableDiffusion3Pipeline`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from typer.testing import CliRunner

import scale_cases
from diffalign.backbones import SD3Backbone, load_backbone
from diffalign.cli import app
from diffalign.trainers import get_trainer
from tiny_models import make_tiny_sd3

LAYOUTS = ["sd35_medium", "sd35_large"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {name: make_tiny_sd3(tmp_path_factory.mktemp(name), with_t5=True, layout=name) for name in LAYOUTS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return scale_cases.write_data(tmp_path_factory.mktemp("sd35_data"))


def _pipe(path):
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    gen = torch.Generator().manual_seed(0)
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, generator=gen, output_type="np")
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sd35_layouts_load_and_predict_like_the_pipeline(layout, paths):
    backbone = load_backbone(paths[layout])
    assert type(backbone) is SD3Backbone and backbone.family == "sd3"
    config = backbone.denoiser.config
    assert config.qk_norm == "rms_norm"
    assert tuple(config.dual_attention_layers) == ((0,) if layout == "sd35_medium" else ())
    blocks = backbone.denoiser.transformer_blocks
    assert (blocks[0].attn2 is not None) == (layout == "sd35_medium") and blocks[1].attn2 is None
    assert type(blocks[0].attn.norm_q).__name__ == "RMSNorm"

    # one stock Euler step from σ = 1 to 0 is x ← x − v(x, σ = 1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = _pipe(paths[layout])("a red circle", num_inference_steps=1, guidance_scale=1.0, latents=x,
                                   output_type="latent").images  # fmt: skip
    v = backbone.predict(x, torch.tensor([1000.0]), backbone.encode_prompts(["a red circle"]))
    torch.testing.assert_close(v, x - out, rtol=1e-5, atol=1e-5)


FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5, "npo": math.log(2), "smpo": math.log(2), "tdpo": math.log(2),
              "tkto": 0.5}  # fmt: skip
"""Policy == reference at step 1 (LoRA B = 0): DPO-family margins 0 → log 2; KTO's 1 − σ(0) = 0.5."""


@pytest.mark.parametrize("method", [*FIRST_LOSS, "self-npo"])
def test_first_loss_every_method_sd35_medium(method, paths, data, tmp_path):
    cfg = scale_cases.config(method, paths["sd35_medium"], data[method], tmp_path, batch_size=2, ga=1, lora_rank=4)
    get_trainer(method)(cfg).train()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    if method == "self-npo":  # no reference term: a pseudo-Huber distance to the teacher's target
        assert math.isfinite(first["loss"]) and first["loss"] > 0
    else:
        assert first["loss"] == pytest.approx(FIRST_LOSS[method], abs=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trained_lora_loads_in_stock_sd3_pipeline(layout, paths, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "dpo", "--model", str(paths[layout]), "--data", data["dpo"], "--output_dir", str(out)]
    args += ["--resolution", "16", "--batch_size", "2", "--max_steps", "2", "--lora_rank", "4", "--lora_alpha", "8"]
    args += ["--learning_rate", "0.05", "--beta", "50", "--checkpointing_steps", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    backbone = load_backbone(paths[layout])
    backbone.add_lora(rank=4, alpha=8)
    state = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    if layout == "sd35_medium":
        assert any(".attn2.to_q." in k for k in state)  # the dual-attention layer is adapted too
    state = convert_unet_state_dict_to_peft({k.removeprefix("transformer."): v for k, v in state.items()})
    assert not set_peft_model_state_dict(backbone.denoiser, state).unexpected_keys

    stock = _pipe(paths[layout])
    base = _images(stock)
    stock.load_lora_weights(out / "final")
    with_lora = _images(stock)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, _images(backbone.make_pipeline()), rtol=0, atol=1e-6)
    assert isinstance(stock.transformer, SD3Transformer2DModel)


def test_sd35_preset_trains_a_step(paths, data, tmp_path):
    args = ["train", "dpo", "--config", "sd35_dpo_lora", "--model", str(paths["sd35_large"]), "--data", data["dpo"]]
    args += ["--output_dir", str(tmp_path), "--resolution", "16", "--batch_size", "2", "--gradient_accumulation_steps"]
    args += ["1", "--max_steps", "1", "--no-gradient_checkpointing", "--mixed_precision", "no", "--optimizer", "adamw"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
