"""`base_quantization` (a torchao-quantised frozen LoRA base) and `offload_text_encoders`: selection and one-line
errors, training on a tiny SD model (first loss log 2, close to the unquantised run after steps), the LoRA file on
the unquantised base in stock diffusers, and text encoders released after caching."""

from __future__ import annotations

import gc
import math
import sys
import weakref

import pytest
import torch
from torch import nn

from diffalign.config import ConfigError, build_config
from diffalign.optional import MissingDependencyError
from diffalign.trainers import DPOTrainer
from diffalign.trainers.quantization import (
    QUANTIZATIONS,
    quantizable_linears,
    quantize_base,
    resolve_base_quantization,
)
from helpers import png_bytes, read_metrics, tiny_config

QUANTIZED = [q for q in QUANTIZATIONS if q != "none"]


# ---- selection and errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_every_kind_runs_on_cpu(kind):
    assert resolve_base_quantization(kind, "cpu") == kind


def test_selection_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"`base_quantization` must be one of .* got 'int4'"):
        resolve_base_quantization("int4", "cpu")
    with pytest.raises(ConfigError, match="runs on cpu or cuda, not on 'mps'"):
        resolve_base_quantization("int8", "mps")
    with pytest.raises(ConfigError, match="not supported under FSDP/DeepSpeed"):
        resolve_base_quantization("nf4", "cuda", sharded=True)
    assert resolve_base_quantization("none", "mps", sharded=True) == "none"  # nothing to check
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError, match="`base_quantization: fp8` needs torch with float8 dtypes"):
        resolve_base_quantization("fp8", "cpu")


def test_missing_or_old_torchao_names_the_extra(monkeypatch):
    import torchao.quantization

    monkeypatch.delattr(torchao.quantization, "Int8WeightOnlyConfig")
    with pytest.raises(MissingDependencyError, match=r"lacks: pip install -U 'diffalign\[quant\]'"):
        resolve_base_quantization("int8", "cpu")
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"`base_quantization: nf4` needs `torchao`.*diffalign\[quant\]"):
        resolve_base_quantization("nf4", "cpu")


def test_config_refusals_are_one_line():
    base = {"model": "m", "data": "d"}
    with pytest.raises(ConfigError, match=r"`lora_rank: 0` is a full fine-tune") as err:
        build_config(DPOTrainer.config_class, base, {"lora_rank": 0, "base_quantization": "int8"})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="`base_quantization`: Input should be 'none', 'int8', 'fp8' or 'nf4'"):
        build_config(DPOTrainer.config_class, base, {"base_quantization": "int4"})
    with pytest.raises(ConfigError, match="set `cache_latents`"):
        build_config(DPOTrainer.config_class, base, {"offload_text_encoders": True})
    for key, value in {"validation_prompts": ["a cat"], "validation_data": "held_out.parquet"}.items():
        with pytest.raises(ConfigError, match=f"`{key}` needs them"):
            build_config(
                DPOTrainer.config_class, base, {"cache_latents": True, "offload_text_encoders": True, key: value}
            )


# ---- quantize_base on a LoRA-wrapped module ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantize_base_leaves_lora_full_precision(kind):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 3))  # last: 192 weights
    net.requires_grad_(False)
    net = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights="gaussian"), net)
    x = torch.randn(5, 64, requires_grad=True)
    expected = net(x)
    stats = quantize_base(net, kind)
    assert set(quantizable_linears(net)) == {"0.base_layer", "2.base_layer", "3"}
    # DDP must not try to broadcast torchao tensors (each process quantises the same weights itself)
    assert set(net._ddp_params_and_buffers_to_ignore) == {"0.base_layer.weight", "2.base_layer.weight", "3.weight"}
    # nf4 needs a multiple of 64 weights: the 3 × 64 layer qualifies; 192 is one, so every layer is quantised
    assert stats["quantized"] == 3 and stats["skipped"] == 0
    ratio = {"int8": 0.3, "fp8": 0.3, "nf4": 0.15}[kind]  # of the fp32 bytes (0.25, 0.25, 0.125) + per-row metadata
    assert stats["bytes_after"] < ratio * stats["bytes_before"]
    for name, p in net.named_parameters():
        if "lora_" in name:
            assert type(p.data) is torch.Tensor and p.dtype == torch.float32 and p.requires_grad, name
        elif name.endswith("weight"):
            assert type(p.data) is not torch.Tensor, f"{name} was not quantised"
    out = net(x)
    out.sum().backward()  # LoRA layers upstream of a quantised layer need the input gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()
    tol = {"int8": 0.02, "fp8": 0.1, "nf4": 0.2}[kind]
    assert (out - expected).abs().max() < tol * expected.abs().max()


# ---- training on a tiny SD model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs_parquet(tmp_path_factory):
    import pandas as pd

    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40)]
    words = ["red", "green", "blue", "yellow"]
    rows = [
        {"caption": f"a {words[i]} square", "jpg_0": png_bytes(colours[i], 40), "jpg_1": png_bytes(colours[i - 1], 40),
         "label_0": float(i % 2 == 0), "label_1": float(i % 2 == 1)}
        for i in range(4)
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _config(model, data, out, **kw):
    values = {"resolution": 32, "batch_size": 2, "beta": 50.0, "max_steps": 3, "learning_rate": 1e-2, **kw}
    return tiny_config(DPOTrainer, model, data, out, **values)


@pytest.fixture(scope="module")
def unquantized_run(tiny_sd_path, pairs_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    DPOTrainer(_config(tiny_sd_path, pairs_parquet, out)).train()
    return read_metrics(out)


@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantized_base_trains_and_its_lora_loads_on_the_unquantized_base(
    kind,
    tiny_sd_path,
    pairs_parquet,
    unquantized_run,
    tmp_path,
):
    trainer = DPOTrainer(_config(tiny_sd_path, pairs_parquet, tmp_path, base_quantization=kind))
    trainer.setup()
    quantized = {f"{n}.weight": m.weight for n, m in quantizable_linears(trainer.denoiser).items()}
    frozen = {n: _dense(w).clone() for n, w in quantized.items() if type(w.data) is not torch.Tensor}
    assert len(frozen) >= len(quantized) - 2, "the denoiser's linear weights were not quantised"
    final = trainer.train()

    records = read_metrics(tmp_path)
    # policy == reference at step 1 (LoRA B = 0, both through the same quantised base): exactly log 2
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # after one and two updates the quantised-base run stays close to the unquantised one; measured |Δ| after one
    # update: int8 1.7e-4, fp8 1.3e-3, nf4 5.9e-3 (after two: 2.5e-5, 9.7e-5, 6.6e-4), while the loss itself moved
    # 3.7e-2 from log 2. nf4 is coarsest on this 32-wide model (a block of 64 weights spans two rows).
    tolerance = {"int8": 1e-3, "fp8": 5e-3, "nf4": 1.5e-2}[kind]
    for quantized_record, plain_record in zip(records[1:], unquantized_run[1:]):
        assert quantized_record["loss"] == pytest.approx(plain_record["loss"], abs=tolerance)
    for n, w in quantized.items():
        if n in frozen:
            assert torch.equal(_dense(w), frozen[n]), f"quantised base weight {n} changed"
    assert all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in trainer.params)
    _stock_pipeline_matches_diffalign(trainer, tiny_sd_path, final)


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A torchao weight as a plain tensor (NF4Tensor names it differently)."""
    w = weight.detach()
    return w.get_original_weight() if hasattr(w, "get_original_weight") else w.dequantize()


def _stock_pipeline_matches_diffalign(trainer, model, final):
    """The LoRA file on the UNquantised base: stock diffusers `load_lora_weights` gives the same images as
    diffalign's unquantised backbone with the trained adapter copied in (measured max |Δ| = 0.0: bit-identical)."""
    from diffusers import StableDiffusionPipeline

    from diffalign.backbones import load_backbone

    def sample(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a red square", num_inference_steps=2, generator=generator, output_type="pt")

    stock = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    base_images = sample(stock).images
    stock.load_lora_weights(final)  # stock diffusers, no diffalign involved
    stock_images = sample(stock).images

    ours = load_backbone(str(model))
    ours.add_lora(trainer.config.lora_rank, trainer.config.lora_alpha)
    trained = dict(trainer._named_trainable())
    with torch.no_grad():
        for name, p in ours.denoiser.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    ours_images = sample(ours.make_pipeline()).images
    assert (stock_images - base_images).abs().max() > 1e-4, "the LoRA did not change the stock pipeline"
    assert (stock_images - ours_images).abs().max() <= 1e-5


# ---- text encoders released after caching ---------------------------------------------------------------------------
def test_offload_text_encoders_releases_them_and_training_matches(tiny_sd_path, pairs_parquet, tmp_path):
    common = dict(cache_latents=True, proportion_empty_prompts=0.5, base_quantization="int8")  # dropout: empty text
    kept = DPOTrainer(_config(tiny_sd_path, pairs_parquet, tmp_path / "kept", **common))
    kept.train()
    trainer = DPOTrainer(_config(tiny_sd_path, pairs_parquet, tmp_path / "off", offload_text_encoders=True, **common))
    trainer.setup()
    assert type(trainer.backbone.text_encoder).__name__ == "ReleasedTextEncoder"
    assert type(trainer.backbone.components["text_encoder"]).__name__ == "ReleasedTextEncoder"
    trainer.train()
    a, b = read_metrics(tmp_path / "kept"), read_metrics(tmp_path / "off")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    with pytest.raises(ConfigError, match="was released after caching"):
        trainer.backbone.encode_prompts(["a red square"])


def test_released_text_encoder_is_freed(tiny_sd_path, pairs_parquet, tmp_path):
    from diffalign.backbones import load_backbone
    from diffalign.trainers.offload import release_text_encoders

    backbone = load_backbone(str(tiny_sd_path))
    alive = weakref.ref(backbone.text_encoder)
    empty = {k: v[0] for k, v in backbone.encode_prompts([""]).items()}
    out = release_text_encoders(backbone, empty, torch.device("cpu"))
    gc.collect()
    assert alive() is None, "the text encoder is still referenced somewhere"
    assert out["prompt_embeds"].shape == (1, *empty["prompt_embeds"].shape)
    backbone.to("cpu")  # moving the backbone still works with the stand-in


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sdxl_and_sd3_train_on_an_nf4_base_without_text_encoders(family, request, pairs_parquet, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}_path")
    low_memory = dict(base_quantization="nf4", cache_latents=True, offload_text_encoders=True)
    trainer = DPOTrainer(_config(model, pairs_parquet, tmp_path, **low_memory))
    trainer.train()
    assert read_metrics(tmp_path)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    linears = quantizable_linears(trainer.denoiser)
    assert all(type(m.weight.data) is not torch.Tensor for m in linears.values())
    encoders = {k: type(m).__name__ for k, m in trainer.backbone.components.items() if k.startswith("text_encoder")}
    assert set(encoders.values()) == {"ReleasedTextEncoder"} and len(encoders) == {"sdxl": 2, "sd3": 3}[family]


def test_ddp_trains_on_a_quantized_base(tiny_sd_path, pairs_parquet, tmp_path):
    """2 CPU processes (gloo): DDP would broadcast every parameter at start, and torchao tensors cannot be broadcast;
    `quantize_base` puts them on DDP's ignore list (each process quantises the same weights itself)."""
    import os
    import subprocess

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd = [*launch, "-m", "diffalign", "train", "dpo", "--model", str(tiny_sd_path), "--data", pairs_parquet,
           "--output_dir", str(tmp_path), "--resolution", "32", "--batch_size", "1", "--max_steps", "2",
           "--lora_rank", "4", "--base_quantization", "int8", "--checkpointing_steps", "0"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert len(records) == 2 and records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(records[1]["loss"]) and (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_base_is_quantised_before_it_moves_to_the_device(monkeypatch, tiny_sd_path, pairs_parquet, tmp_path):
    """setup() casts, adds the LoRA and quantises on the CPU, then moves the backbone: the device never holds the fp32
    or unquantised base (checked here on the move's call, since CPU is the device)."""
    from diffalign.backbones.base import PipelineBackbone

    seen = []
    original = PipelineBackbone.to

    def recording_to(self, device, frozen_dtype=None):
        weights = [m.weight for m in quantizable_linears(self.denoiser).values()]
        seen.append((all(type(w.data) is not torch.Tensor for w in weights), {w.dtype for w in weights}))
        return original(self, device, frozen_dtype)

    monkeypatch.setattr(PipelineBackbone, "to", recording_to)
    cfg = _config(tiny_sd_path, pairs_parquet, tmp_path, base_quantization="int8", mixed_precision="bf16")
    DPOTrainer(cfg).setup()
    assert seen[-1] == (True, {torch.bfloat16})  # the move in setup: quantised, from bf16
    assert seen[0][0] is False  # loading (from_pretrained) still sees the plain weights


@pytest.mark.parametrize("preset, family", [("sdxl_dpo_lowvram", "sdxl"), ("sd35_dpo_lowvram", "sd3")])
def test_lowvram_presets_train_on_tiny_models(preset, family, request, pairs_parquet, tmp_path):
    """The presets' combination (bf16, int8/nf4 base, cache + released encoders, 8-bit Adam → AdamW on CPU,
    gradient checkpointing, batch 1 + accumulation) runs end to end; only the size keys are overridden."""
    from diffalign.config import load_config

    model = request.getfixturevalue(f"tiny_{family}_path")
    small = [
        "--resolution",
        "32",
        "--max_steps",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--output_dir",
        str(tmp_path),
    ]
    cfg = load_config(DPOTrainer.config_class, preset, ["--model", str(model), "--data", pairs_parquet, *small])
    DPOTrainer(cfg).train()
    assert read_metrics(tmp_path)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
