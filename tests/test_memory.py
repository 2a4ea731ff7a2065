"""`diffalign.memory`: the peak-memory formula against a hand computation, the parameter counting, and the low-VRAM
presets (they parse for their method and their estimates fit the GPU each one names)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffalign.config import load_config
from diffalign.memory import NF4_BYTES, ModelCounts, denoiser_bytes, estimate, layout_counts, module_counts
from diffalign.trainers import DPOTrainer

COUNTS = ModelCounts(
    name="hand",
    linear=1_000_000,
    linear_rows=1_000,
    other=200_000,
    text=300_000,
    vae=50_000,
    lora_per_rank=2_000,
    act_bytes_1024=4_000_000,
    buffers=10_000,
    act_text_bytes=100_000,
)


def test_formula_by_hand():
    # bf16, no quantisation: (1e6 + 2e5 + 1e4 buffer)·2 = 2.42e6
    assert denoiser_bytes(COUNTS, "none", "bf16") == 2_420_000
    # int8: 1e6·1 + 1e3 rows·2 (bf16 scale) + (2e5 + 1e4)·2 = 1_422_000
    assert denoiser_bytes(COUNTS, "int8", "bf16") == 1_422_000
    # fp8: 1e6·1 + 1e3 rows·4 (fp32 scale) + (2e5 + 1e4)·2 = 1_424_000
    assert denoiser_bytes(COUNTS, "fp8", "bf16") == 1_424_000
    # nf4: 1e6·(0.5 + 1/64 + 4/16384) + (2e5 + 1e4)·2 = 500_000 + 15_625 + 244.140625 + 420_000
    assert denoiser_bytes(COUNTS, "nf4", "bf16") == pytest.approx(935_869.140625)
    assert NF4_BYTES == pytest.approx(0.515869140625)

    e = estimate(COUNTS, quantization="int8", lora_rank=4, optimizer="adamw8bit", images=2, resolution=512)
    assert e["text_encoders"] == 600_000  # 3e5·2
    assert e["vae"] == 100_000
    assert e["lora"] == 4 * 2_000 * (4 + 4 + 2)  # fp32 weight + fp32 grad + 8-bit Adam's 2 states
    assert e["activations"] == 2 * (100_000 + 4_000_000 * 0.25)  # 2 images: text part + (512/1024)² of the pixel part
    assert e["total"] == 1_422_000 + 600_000 + 100_000 + 80_000 + 2_200_000
    off = estimate(COUNTS, text_encoders_resident=False, precision="no", optimizer="adamw", lora_rank=1)
    assert off["text_encoders"] == 0 and off["denoiser"] == 4_840_000 and off["lora"] == 2_000 * 16
    assert off["activations"] == 2 * 4_100_000 * 2  # fp32 activations: twice the 16-bit bytes


def test_module_counts_by_hand():
    net = nn.Sequential(nn.Linear(8, 16), nn.Conv2d(3, 4, 3), nn.Linear(16, 2))
    net[0].to_q = nn.Linear(4, 4, bias=False)  # a LoRA target (named `0.to_q`)
    counts = module_counts(net)
    assert counts["linear"] == 8 * 16 + 16 * 2 + 4 * 4
    assert counts["linear_rows"] == 16 + 2 + 4
    assert counts["other"] == 16 + 2 + (3 * 4 * 9 + 4)  # biases + the convolution
    assert counts["lora_per_rank"] == 4 + 4
    assert counts["buffers"] == 0
    net.register_buffer("table", torch.zeros(5, 7))
    assert module_counts(net)["buffers"] == 35


def test_sdxl_layout_is_the_released_unet():
    counts = layout_counts("sdxl")
    assert counts.linear + counts.other == 2_567_463_684  # SDXL base 1.0 UNet parameter count
    assert counts.text == 123_060_480 + 694_659_840  # CLIP-L + OpenCLIP bigG with projection


def test_dit_activation_term_by_hand():
    from diffalign.memory import dit_activation_bytes

    # SD3.5 Medium: (24 blocks + k 28) · 1536 width · 2 bytes = 159 744 bytes per token per image
    assert dit_activation_bytes(24, 1, 1536) == 159_744
    counts = layout_counts("sd35-medium")
    assert counts.act_bytes_1024 == 4096 * 159_744 and counts.act_text_bytes == 333 * 159_744


@pytest.mark.parametrize(
    "preset, gpu_gb", [("sdxl_dpo_lowvram", 12), ("sd35_dpo_lowvram", 16), ("flux_dpo_lowvram", 24)]
)
def test_lowvram_presets_parse_and_their_estimate_fits(preset, gpu_gb):
    import importlib.util
    from pathlib import Path

    cfg = load_config(DPOTrainer.config_class, preset, ["--model", "m", "--data", "d"])
    assert cfg.base_quantization != "none" and cfg.gradient_checkpointing and cfg.batch_size == 1
    assert cfg.cache_latents and cfg.offload_text_encoders and cfg.optimizer == "adamw8bit"
    path = Path(__file__).resolve().parent.parent / "scripts" / "memory_estimate.py"
    spec = importlib.util.spec_from_file_location("memory_estimate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    total = module.preset_estimate(preset, module.PRESETS[preset])["total"]
    assert total < (gpu_gb - 1) * 1e9  # 1 GB for the CUDA context and fragmentation
    assert f"{total / 1e9:.1f} GB" in Path(module.PRESET_DIR / f"{preset}.yaml").read_text()
