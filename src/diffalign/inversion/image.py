"""`diffalign invert`: invert one image with a model, reconstruct it, and measure the reconstruction error."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

from .renoise import ReNoiseConfig, invert, paper_renoise, sample
from .schedule import sampling_schedule

logger = logging.getLogger(__name__)


def invert_image(
    model: str | Path,
    image: str | Path | Image.Image,
    prompt: str,
    out: str | Path,
    *,
    num_steps: int = 50,
    renoise: ReNoiseConfig | dict | None = None,
    guidance_scale: float = 1.0,
    resolution: int | None = None,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Invert `image` (resized and centre-cropped to `resolution`) under `prompt`, sample it back with the matching
    sampler, and write to `out/`: `inverted.safetensors` (`latents` = the inverted noise, `x0` = the encoded image;
    metadata = the settings), `input.png`, `reconstruction.png`, `inversion.json` (the returned report).

    Args:
        model (`str` or `Path`): a local diffusers pipeline folder (SD1.x/2.x, SDXL, SD3) or a Hub id when online.
        num_steps (`int`, defaults to 50): sampler / inversion steps.
        renoise (`ReNoiseConfig` or `dict`, *optional*): defaults to ReNoise's official settings for the model's
            family (`paper_renoise`: `RENOISE_SD` for SD1.x/2.x ε models); a `dict` replaces some of their fields.
        guidance_scale (`float`, defaults to 1.0): CFG for both inversion and reconstruction (1 = conditional only,
            which reconstructs best).
        resolution (`int`, *optional*): defaults to the model's native size.

    Returns:
        `dict`: `latent_mse` (clean latent vs its reconstruction), `psnr` (reconstructed image vs the input, dB),
        `psnr_vae` (VAE round trip alone, the ceiling), `latent_std` (of the inverted noise; ≈ 1 for Gaussian-like),
        the settings and the output paths.
    """
    from diffalign.backbones import load_backbone
    from diffalign.data.images import open_image
    from diffalign.data.transforms import preprocess

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(model).to(device)
    if not isinstance(renoise, ReNoiseConfig):
        renoise = replace(paper_renoise(backbone), **(renoise or {}))
    resolution = resolution or backbone.denoiser.config.sample_size * backbone.vae_scale_factor
    picture = image if isinstance(image, Image.Image) else open_image(str(image))
    pixels = preprocess(picture, resolution).pixels.unsqueeze(0).to(device)
    x0 = backbone.encode_images(pixels)
    cond, uncond = _conditions(backbone, prompt, resolution, guidance_scale)
    schedule = sampling_schedule(backbone, num_steps)
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(guidance_scale=guidance_scale, uncond=uncond)
    result = invert(backbone, x0, cond, schedule, renoise=renoise, generator=generator, **kwargs)
    x0_rec = sample(backbone, result.latents, cond, schedule, eta=renoise.eta, noises=result.noises, **kwargs)
    decoded, vae_only = backbone.decode_latents(x0_rec), backbone.decode_latents(x0)
    report = {
        "latent_mse": float((x0_rec - x0).pow(2).mean()),
        "psnr": _psnr(decoded, pixels),
        "psnr_vae": _psnr(vae_only, pixels),
        "latent_std": float(result.latents.std()),
        "model": str(model),
        "prompt": prompt,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "renoise": asdict(renoise),
    }
    report.update(_write(Path(out), result.latents, x0, pixels, decoded, report))
    logger.info("inverted %s: latent MSE %.3g, PSNR %.2f dB (VAE alone %.2f dB)", image, *_summary(report))
    return report


def _conditions(backbone, prompt: str, resolution: int, guidance_scale: float):
    cond = backbone.build_condition(backbone.encode_prompts([prompt]), target_size=(resolution, resolution))
    if guidance_scale == 1.0:
        return cond, None
    uncond = backbone.build_condition(backbone.encode_prompts([""]), target_size=(resolution, resolution))
    return cond, uncond


def _psnr(image: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float((image.float() - target.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _summary(report: dict) -> tuple[float, float, float]:
    return report["latent_mse"], report["psnr"], report["psnr_vae"]


def _to_png(pixels: torch.Tensor, path: Path) -> None:
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)


def _write(out: Path, latents, x0, pixels, decoded, report: dict) -> dict:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    paths = {"latents": out / "inverted.safetensors", "input": out / "input.png"}
    paths.update(reconstruction=out / "reconstruction.png", report=out / "inversion.json")
    metadata = {k: json.dumps(v) for k, v in report.items()}
    tensors = {"latents": latents.detach().cpu().contiguous(), "x0": x0.detach().cpu().contiguous()}
    save_file(tensors, str(paths["latents"]), metadata=metadata)
    _to_png(pixels, paths["input"])
    _to_png(decoded, paths["reconstruction"])
    files = {f"{k}_path": str(v) for k, v in paths.items()}
    paths["report"].write_text(json.dumps({**report, **files}, indent=2))
    return files
