"""The grid of noise levels a deterministic sampler walks, in inversion order (clean → noisy).

A `Schedule` of n steps says, for step k (k = 0 is the least noisy): the model timestep `timesteps[k]`, the source
level `(alpha_from[k], sigma_from[k])` and the target level `(alpha_to[k], sigma_to[k])`. Inversion step k goes
from → to with the model evaluated at `timesteps[k]`; the sampler's step k goes to → from with the model evaluated at
the same timestep, which is what makes sampling the exact inverse of a converged inversion.

- VP family (SD1.x/2.x, SDXL): the grid of diffusers' `DDIMScheduler` built from the pipeline's scheduler config
  (`timestep_spacing`, `steps_offset`); a sampling step at t goes to t − T/n, and the last one to the clean level
  ᾱ = 1 (`set_alpha_to_one`) or ᾱ_0.
- Rectified flow (SD3 family): the σ grid of `FlowMatchEulerDiscreteScheduler` (with its `shift`), ending at σ = 0;
  the model timestep is σ·T. FLUX: the grid `FluxPipeline` samples on (`FluxBackbone.sampling_sigmas`), shifted for
  the image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.backbones.base import Backbone


@dataclass
class Schedule:
    """Per-step model timesteps and (α, σ) of both ends, inversion order. All tensors `[n]`, float32 except
    `timesteps` (long for VP, float32 for flow)."""

    timesteps: torch.Tensor
    alpha_from: torch.Tensor
    sigma_from: torch.Tensor
    alpha_to: torch.Tensor
    sigma_to: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def sampling_schedule(backbone: Backbone, num_steps: int, resolution: int | None = None) -> Schedule:
    """The `num_steps`-step DDIM (VP) or flow-Euler (SD3, FLUX) grid of `backbone`'s inference scheduler config.

    Args:
        backbone (`Backbone`): a loaded backbone with a `scheduler` (any diffusers scheduler of the pipeline).
        num_steps (`int`): number of sampling (= inversion) steps, ≥ 1.
        resolution (`int`, *optional*): image side in pixels; needed only by schedulers whose shift depends on the
            image size (FLUX's `use_dynamic_shifting`).
    """
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be >= 1, got {num_steps}")
    if backbone.prediction_type == "flow_matching":
        return _flow_schedule(backbone, num_steps, resolution)
    return _vp_schedule(backbone, num_steps)


def _vp_schedule(backbone: Backbone, num_steps: int) -> Schedule:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(backbone.scheduler.config)
    ddim.set_timesteps(num_steps)
    t = ddim.timesteps.flip(0).long()  # ascending
    alphas_cumprod = ddim.alphas_cumprod.double()
    final = torch.as_tensor(ddim.final_alpha_cumprod, dtype=torch.float64)
    prev = t - ddim.config.num_train_timesteps // num_steps
    a_from = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    a_to = alphas_cumprod[t]
    return Schedule(
        t, a_from.sqrt().float(), (1 - a_from).sqrt().float(), a_to.sqrt().float(), (1 - a_to).sqrt().float()
    )


def _flow_schedule(backbone: Backbone, num_steps: int, resolution: int | None = None) -> Schedule:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if hasattr(backbone, "sampling_sigmas"):  # FLUX: the pipeline's own σ grid and resolution shift
        sigmas = backbone.sampling_sigmas(num_steps, resolution).double()
    else:
        flow = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler.config)
        if flow.config.get("use_dynamic_shifting", False):
            raise ValueError(
                "the scheduler uses dynamic shifting (`use_dynamic_shifting=True`), which needs the image size; "
                "SD3/SD3.5 pipelines do not use it"
            )
        flow.set_timesteps(num_steps)
        sigmas = flow.sigmas.double()  # descending, ending with 0
    s_to = sigmas[:-1].flip(0)
    s_from = sigmas[1:].flip(0)
    timesteps = (s_to * backbone.num_train_timesteps).float()
    return Schedule(timesteps, (1 - s_from).float(), s_from.float(), (1 - s_to).float(), s_to.float())
