"""Peak memory of the low-VRAM presets from `diffalign.memory`'s formula, and a CPU measurement to check it.

    python scripts/memory_estimate.py                                   # estimate table: every lowvram preset
    python scripts/memory_estimate.py --config sdxl_dpo_lora --layout sdxl   # any preset or YAML on a layout
    python scripts/memory_estimate.py --measure --quantization int8     # measure SDXL LoRA on CPU (random weights)

`--measure` builds the real SDXL UNet layout (2.57 B parameters, random bf16 weights: no downloads), adds LoRA r8 on
the default attention projections, applies `base_quantization` with diffalign's own `quantize_base`, turns on
gradient checkpointing and runs one Diffusion-DPO step as the trainer does (1 pair: policy forward + backward with
autocast bf16, reference forward with adapters disabled, AdamW on the LoRA weights). Text encoders and VAE are not
built (a cached, `offload_text_encoders` run holds neither... but the VAE: it is in the formula's `vae` term).
It reports resident memory (RSS) above the process's baseline after the weights are built (and the bytes its tensors
hold), and the peak RSS of the step (Linux `VmHWM`, reset with `/proc/self/clear_refs` before the step), next to the
formula's terms. Run it with `MALLOC_MMAP_THRESHOLD_=65536`: otherwise glibc keeps freed blocks (the bf16 weights
replaced by int8 ones) in its heap and RSS never shows the saving.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from diffalign.memory import GB, LAYOUTS, estimate, layout_counts, module_counts

PRESETS = {"sdxl_dpo_lowvram": "sdxl", "sd35_dpo_lowvram": "sd35-large", "flux_dpo_lowvram": "flux-dev"}
PRESET_DIR = Path(__file__).resolve().parent.parent / "src" / "diffalign" / "configs"


def preset_estimate(preset: str, layout: str) -> dict[str, float]:
    """The formula's terms for a preset name or YAML path on a layout of `diffalign.memory.LAYOUTS`."""
    from diffalign.config import read_yaml

    cfg = read_yaml(preset)
    counts = layout_counts(layout)
    return estimate(
        counts,
        quantization=cfg.get("base_quantization", "none"),
        precision=cfg.get("mixed_precision", "no"),
        lora_rank=cfg.get("lora_rank", 8),
        optimizer=cfg.get("optimizer", "adamw"),
        text_encoders_resident=not cfg.get("offload_text_encoders", False),
        images=2 * cfg.get("batch_size", 1),
        resolution=cfg.get("resolution", 512),
    ) | {"act_source": counts.act_source}


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in bytes, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(quantization: str, resolution: int, rank: int = 8, layout: str = "sdxl") -> dict:
    """One DPO step of a LoRA on CPU (`layout`: `sdxl` or `sd35-medium`); bytes above the baseline RSS."""
    import diffusers
    from peft import LoraConfig

    from diffalign.memory import LORA_TARGETS
    from diffalign.objectives import dpo_loss, per_sample_error
    from diffalign.trainers.quantization import _nbytes, quantize_base

    gc.collect()
    base, _ = _rss()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    _, cls_name, kwargs = LAYOUTS[layout]["denoiser"]
    unet = getattr(diffusers, cls_name)(**kwargs).to(torch.bfloat16)  # as setup casts a LoRA base (buffers too)
    torch.set_default_dtype(torch.float32)
    counts = module_counts(unet)
    unet.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    unet.add_adapter(lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    quantize_base(unet, quantization)
    gc.collect()
    weights = _rss()[0] - base
    held = sum(_nbytes(p) for p in unet.parameters()) + sum(b.numel() * b.element_size() for b in unet.buffers())
    build_s = time.perf_counter() - t0
    unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    h = resolution // 8
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16  # the backbone casts every input to the network's dtype
    channels = 4 if layout == "sdxl" else 16
    x_t, eps = torch.randn(2, channels, h, h, generator=g).to(bf16), torch.randn(2, channels, h, h, generator=g)
    t = torch.tensor([500, 500])
    if layout == "sdxl":
        cond = {
            "encoder_hidden_states": torch.randn(2, 77, 2048, generator=g).to(bf16),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, generator=g).to(bf16),
                                  "time_ids": torch.randn(2, 6).to(bf16)},
        }  # fmt: skip
    else:  # SD3: CLIP-L/G + T5 tokens (77 + 256) of width 4096, pooled 2048
        cond = {
            "encoder_hidden_states": torch.randn(2, 333, 4096, generator=g).to(bf16),
            "pooled_projections": torch.randn(2, 2048, generator=g).to(bf16),
        }
    if layout == "sdxl":
        forward = lambda net, x, t, cond: net(x, t, **cond)  # noqa: E731
    else:
        forward = lambda net, x, t, cond: net(hidden_states=x, timestep=t, **cond)  # noqa: E731
    gc.collect()
    _reset_peak()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = forward(unet, x_t, t, cond).sample.float()
        model_err = per_sample_error(pred, eps)
        with torch.no_grad():
            unet.disable_adapters()
            ref_err = per_sample_error(forward(unet, x_t, t, cond).sample.float(), eps)
            unet.enable_adapters()
    loss, _ = dpo_loss(model_err[:1], model_err[1:], ref_err[:1], ref_err[1:], beta=5000.0)
    loss.backward()
    opt.step()
    step_s = time.perf_counter() - t0
    peak = _rss()[1] - base
    formula = estimate(
        layout_counts(layout), quantization=quantization, lora_rank=rank, text_encoders_resident=False,
        resolution=resolution,
    )  # fmt: skip
    return {
        "layout": layout,
        "quantization": quantization,
        "resolution": resolution,
        "loss": float(loss),
        "measured_weights_gb": weights / GB,
        "tensor_bytes_gb": held / GB,
        "formula_weights_gb": (formula["denoiser"] + rank * counts["lora_per_rank"] * 4) / GB,
        "measured_step_peak_gb": peak / GB,
        "formula_no_activations_gb": (formula["total"] - formula["activations"] - formula["vae"]) / GB,
        "implied_activations_gb": (peak - weights - rank * counts["lora_per_rank"] * 12) / GB,
        "formula_activations_gb": formula["activations"] / GB,
        "build_s": build_s,
        "step_s": step_s,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="measure SDXL LoRA on CPU instead of the table")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "fp8", "nf4"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument(
        "--layout", default="sdxl", choices=sorted(LAYOUTS), help="model layout (--measure: sdxl or sd35-medium)"
    )
    parser.add_argument("--config", help="estimate this preset or YAML file on --layout instead of the lowvram table")
    args = parser.parse_args()
    if args.measure:
        if args.layout not in ("sdxl", "sd35-medium"):
            parser.error("--measure builds sdxl or sd35-medium (the larger layouts do not fit a 16 GB CPU run)")
        print(json.dumps(measure(args.quantization, args.resolution, layout=args.layout), indent=1))
        return
    presets = {args.config: args.layout} if args.config else PRESETS
    print("| preset | layout | denoiser | text enc. | VAE | LoRA + Adam | activations | total GB | activations from |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, layout in presets.items():
        e = preset_estimate(preset, layout)
        cells = [f"{e[k] / GB:.2f}" for k in ("denoiser", "text_encoders", "vae", "lora", "activations", "total")]
        print(f"| `{preset}` | {layout} | " + " | ".join(cells) + f" | {e['act_source']} |")


if __name__ == "__main__":
    sys.exit(main())
