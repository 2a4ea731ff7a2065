"""Who labels a round's candidates: the DPO implicit reward of the current model against an anchor (SAIL), or any
reward of the `diffalign.rewards` registry (online / iterative DPO). A labeler maps one prompt's N candidate images
to N scores; the round pairs the best with the worst."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from diffalign.objectives import dpo_implicit_reward, per_sample_error


def pixels_of(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → `[N, 3, H, W]` float32 in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class ImplicitRewardLabeler:
    """SAIL's self-annotation: r(c, x) = −β/2·(‖ε − ε_θ(x_t,c,t)‖² − ‖ε − ε_ref(x_t,c,t)‖²), averaged over
    `noise_draws` (t, ε) draws shared by every candidate of the prompt (`objectives.dpo_implicit_reward`).

    Args:
        policy (`str`): pipeline folder of the judge's policy (the current model εⁱ).
        reference (`str`): pipeline folder of the anchor (ε⁰; the base in round 1).
        beta (`float`): β (official DPO convention); only scales the rewards, never changes the ranking.
        noise_draws (`int`): K (paper: 10).
        batch_size (`int`): denoiser rows per forward pass.
    """

    name = "implicit"

    def __init__(self, policy: str, reference: str, beta: float, noise_draws: int = 10, batch_size: int = 32,
                 device: str = "cpu"):  # fmt: skip
        from diffalign.backbones import load_backbone

        self.backbone = load_backbone(policy).to(device)
        self.ref_denoiser = load_backbone(reference).denoiser.to(device).eval()
        self.backbone.denoiser.eval()
        self.beta, self.noise_draws, self.batch_size = beta, noise_draws, batch_size

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompt: str, generator: torch.Generator) -> torch.Tensor:
        bb, n, k = self.backbone, len(images), self.noise_draws
        pixels = pixels_of(images)
        x0 = bb.encode_images(pixels * 2 - 1)  # [N, C, h, w]
        t = bb.sample_timesteps(k, generator=generator).to(x0.device)  # one (t, ε) per draw, shared by all N
        eps = torch.randn((k, *x0.shape[1:]), generator=generator).to(x0.device, x0.dtype)
        x0_rows, eps_rows, t_rows = x0.repeat(k, 1, 1, 1), eps.repeat_interleave(n, 0), t.repeat_interleave(n)
        size = tuple(pixels.shape[-2:])
        cond1 = bb.build_condition(bb.encode_prompts([prompt]), target_size=size)
        model_err, ref_err = [], []
        for start in range(0, k * n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            x0_b, eps_b, t_b = x0_rows[sl], eps_rows[sl], t_rows[sl]
            cond = {key: v.expand(len(x0_b), *v.shape[1:]) for key, v in cond1.items()}
            x_t, target = bb.add_noise(x0_b, eps_b, t_b), bb.training_target(x0_b, eps_b, t_b)
            model_err.append(per_sample_error(bb.predict(x_t, t_b, cond, denoiser=bb.denoiser), target))
            ref_err.append(per_sample_error(bb.predict(x_t, t_b, cond, denoiser=self.ref_denoiser), target))
        return dpo_implicit_reward(torch.cat(model_err).view(k, n), torch.cat(ref_err).view(k, n), self.beta)


class RewardLabeler:
    """An external reward from the registry (`toy`, `pickscore`, `hps`, `aesthetic`, …): online / iterative DPO."""

    def __init__(self, spec: str | dict[str, Any], device: str | None = None):
        from diffalign.rewards import create, parse_spec

        self.name, name, kwargs = parse_spec(spec)
        kwargs = {"device": device or "cpu", **kwargs}
        self.reward = create(name, **kwargs)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompt: str, generator: torch.Generator | None = None):
        return torch.as_tensor(self.reward(pixels_of(images), [prompt] * len(images)), dtype=torch.float32).cpu()


# ---- health of the loop ----------------------------------------------------------------------------------------
def diversity(pixels: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance ([0, 1] scale) between a prompt's candidates (different seeds); 0 when every
    seed gave the same image — the collapse SAIL warns about."""
    flat = pixels.flatten(1).float()
    n = len(flat)
    if n < 2:
        return 0.0
    d = torch.cdist(flat, flat).pow(2) / flat.shape[1]
    return float(d.sqrt()[torch.triu_indices(n, n, 1).unbind()].mean())


def concordance(labels: torch.Tensor, heldout: torch.Tensor) -> float | None:
    """Over all candidate pairs the labeler orders (label ties left out), the fraction the held-out reward orders
    the same way (its ties count half); `None` when the labeler tied every pair."""
    i, j = torch.triu_indices(len(labels), len(labels), 1)
    dl, dh = labels[i] - labels[j], heldout[i] - heldout[j]
    keep = dl != 0
    if not keep.any():
        return None
    agree = (torch.sign(dl[keep]) == torch.sign(dh[keep])).float() + 0.5 * (dh[keep] == 0).float()
    return float(agree.mean())


def margin_summary(margins: list[float]) -> dict[str, float]:
    """Distribution of the label margins r_w − r_l of the round's pairs, and `confidence` = mean σ(margin)."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        return {}
    return {
        "margin_mean": float(m.mean()),
        "margin_median": float(np.median(m)),
        "margin_p10": float(np.quantile(m, 0.1)),
        "margin_p90": float(np.quantile(m, 0.9)),
        "margin_min": float(m.min()),
        "confidence": float((1 / (1 + np.exp(-m))).mean()),
    }
