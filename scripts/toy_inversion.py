"""Reconstruction error of DDIM and ReNoise inversion on the shipped toy pipeline (README, "Inversion as a library").

The 8 first `heldout` captions rendered exactly (`toyworld.render`, rng = row), encoded, inverted over the toy
model's DDIM grid of N steps and sampled back with the same grid; printed: the relative latent error
‖x̂0 − x0‖² / ‖x0‖² per setting and N, as a markdown table.

    OMP_NUM_THREADS=1 python scripts/toy_inversion.py --steps 5,10,20,50
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import typer

from diffalign.backbones import load_backbone
from diffalign.inversion import RENOISE_SD, SMPO_RENOISE, ReNoiseConfig, invert, sample, sampling_schedule
from diffalign.toyworld.sampling import pipeline_path
from diffalign.toyworld.world import prompts, render

SETTINGS = {
    "DDIM (K = 0)": ReNoiseConfig(),
    "official SD (`RENOISE_SD`)": RENOISE_SD,
    "official SD, λ_kl = 0": replace(RENOISE_SD, lambda_kl=0.0),
    "official SD, no regularisation": replace(RENOISE_SD, lambda_kl=0.0, lambda_ac=0.0),
    "K = 1": ReNoiseConfig(num_renoise_steps=1),
    "K = 1 averaged (SmPO)": SMPO_RENOISE,
    "K = 2": ReNoiseConfig(num_renoise_steps=2),
}


def main(steps: str = typer.Option("5,10,20,50", help="comma-separated grid sizes"), rows: int = 8) -> None:
    torch.set_num_threads(1)
    toy = load_backbone(pipeline_path())
    captions = prompts("heldout")[:rows]
    images = [np.asarray(render(c, rng=i).convert("RGB"), dtype=np.float32) for i, c in enumerate(captions)]
    pixels = torch.stack([torch.from_numpy(a / 127.5 - 1).permute(2, 0, 1) for a in images])
    x0 = toy.encode_images(pixels)
    cond = toy.build_condition(toy.encode_prompts(captions), target_size=tuple(pixels.shape[-2:]))
    grid = [int(n) for n in steps.split(",")]
    typer.echo("| setting | " + " | ".join(f"{n} steps" for n in grid) + " |")
    typer.echo("|---" * (len(grid) + 1) + "|")
    for name, cfg in SETTINGS.items():
        cells = []
        for n in grid:
            schedule = sampling_schedule(toy, n)
            try:
                latents = invert(toy, x0, cond, schedule, renoise=cfg, generator=torch.Generator().manual_seed(0))
            except FloatingPointError:
                cells.append("diverges")
                continue
            x0_rec = sample(toy, latents.latents, cond, schedule)
            cells.append(f"{float((x0_rec - x0).pow(2).sum() / x0.pow(2).sum()):.2g}")
        typer.echo(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    typer.run(main)
