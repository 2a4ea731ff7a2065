"""FLUX.1 (dev / schnell): CLIP-L pooled + T5 sequence embeddings, a 16-channel VAE, `FluxTransformer2DModel` over
packed 2x2 latents, rectified flow.

Noising process: rectified flow as for SD3 (`backbones.sd3`), x_σ = (1 − σ)·x0 + σ·ε, and the transformer regresses
the velocity v = ε − x0. Latents stay `[N, 16, h, w]` everywhere outside `predict`, which packs them into `[N, h·w/4,
64]` tokens (2x2 patches, `FluxPipeline._pack_latents`), adds the position ids (`img_ids` = (0, row, col) of each
patch, `txt_ids` = zeros) and unpacks the output.

Training σ, following diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`:
    1. u from a density: logit-normal (`u = sigmoid(n)`, n ~ N(m, s²), m = 0, s = 1) or uniform (the script's default
       `--weighting_scheme none`; `timestep_sampling = "uniform"` here);
    2. σ = the scheduler's TRAINING sigma at u: the script reads `noise_scheduler.sigmas[int(u·T)]`, and
       `FlowMatchEulerDiscreteScheduler` shifts its training sigmas by the static `shift` (σ = s·u / (1 + (s − 1)·u))
       only when `use_dynamic_shifting` is off. FLUX.1-dev's scheduler has it on, so the script trains dev on the
       UNshifted σ = u; schnell's static shift is 1.0, also σ = u. We use the continuous u, not the 1000-step grid.
    Optional (`image_seq_len` set): the resolution-dependent shift the pipeline uses at inference,
    σ = e^μ / (e^μ + 1/u − 1) with μ = `calculate_shift(image_seq_len)` (linear in the number of packed tokens from
    `base_shift` at `base_image_seq_len` to `max_shift` at `max_image_seq_len`).
The transformer's timestep is σ (the pipeline passes t / 1000); `t` here is σ·T like every flow backbone.

Guidance embedding. FLUX.1-dev is guidance-distilled (`guidance_embeds=True`): the CFG scale is an INPUT of the
network and there is no unconditional branch. Training feeds `guidance_scale` (3.5, the diffusers FLUX LoRA script's
`--guidance_scale` default, "the FLUX.1 dev variant is a guidance distilled model"; its README_flux.md examples pass
1) to every forward pass, policy and reference alike. Methods that need CFG's unconditional branch (Self-NPO's guided
teacher, NPO negative adapters used in that branch) are refused on such a model (`check_cfg_branch`). schnell has no
guidance embedding (`guidance=None`).

Preference objectives on flow models (Flow-DPO, Liu et al. 2025, "Improving Video Generation with Human Feedback",
arXiv 2501.13918): the Diffusion-DPO loss with the per-sample velocity errors ‖v − v_θ(x_σ, σ, c)‖² in place of the
ε errors, the same σ and ε for winner and loser:
    inside = −½β·((‖v_w − v_θ,w‖² − ‖v_l − v_θ,l‖²) − (‖v_w − v_ref,w‖² − ‖v_l − v_ref,l‖²)).
diffalign gets this for free: `training_target` is ε − x0 and `objectives.per_sample_error` compares it with the
prediction. There is no official diffusers SD3/FLUX DPO script (research_projects/diffusion_dpo covers SD1.5 and SDXL).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from diffusers import FluxPipeline
from torch import nn

from diffalign.backbones.base import PipelineBackbone
from diffalign.backbones.sd3 import TIMESTEP_SAMPLINGS, SD3Backbone, draw_u
from diffalign.config import ConfigError

__all__ = ["FluxBackbone", "TIMESTEP_SAMPLINGS"]
GUIDANCE_SCALE = 3.5
"""diffusers `train_dreambooth_lora_flux.py`, `--guidance_scale` default."""


class GuidanceDistilledError(ConfigError):
    """The model has no classifier-free-guidance unconditional branch (guidance-distilled FLUX.1-dev)."""


class FluxBackbone(PipelineBackbone):
    """FLUX.1 (`FluxPipeline` folders): dev (guidance-distilled) and schnell.

    Attributes:
        guidance_embeds (`bool`): the transformer takes a guidance-scale input (FLUX.1-dev).
        guidance_scale (`float`, defaults to 3.5): the guidance value fed to a guidance-distilled transformer during
            training (diffusers' FLUX LoRA script default); ignored when `guidance_embeds` is False.
        timestep_sampling (`str`, defaults to `"logit_normal"`): density of u, `"logit_normal"` or `"uniform"`.
        logit_mean, logit_std (`float`, default 0.0 and 1.0): parameters of the logit-normal.
        image_seq_len (`int`, *optional*): when set, shift σ by the pipeline's resolution-dependent μ for this many
            packed tokens ((H/16)·(W/16) for the 8x VAE); None follows the diffusers training script (see above).
        max_sequence_length (`int`, defaults to 512): T5 tokens, `FluxPipeline`'s default for dev and schnell (use the
            value you will sample with: the LoRA learns at this text length).
    """

    family: ClassVar[str] = "flux"
    denoiser_subfolder: ClassVar[str] = "transformer"
    pipeline_class: ClassVar[type] = FluxPipeline
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"

    alpha_sigma = SD3Backbone.alpha_sigma  # the same rectified flow: (α, σ) = (1 − σ, σ), σ = t / T

    def __init__(self, pipe, frozen_dtype: torch.dtype = torch.float32):
        super().__init__(pipe, frozen_dtype)
        self.clip_encoder, self.clip_tokenizer = self.components["text_encoder"], self.components["tokenizer"]
        self.t5_encoder, self.t5_tokenizer = self.components["text_encoder_2"], self.components["tokenizer_2"]
        self.prediction_type = "flow_matching"
        config = self.scheduler.config
        self.num_train_timesteps = config.num_train_timesteps
        self.shift = float(config.get("shift", 1.0))
        self.dynamic_shift = bool(config.get("use_dynamic_shifting", False))
        self.guidance_embeds = bool(self.denoiser.config.guidance_embeds)
        self.guidance_scale = GUIDANCE_SCALE
        self.timestep_sampling = "logit_normal"
        self.logit_mean, self.logit_std = 0.0, 1.0
        self.image_seq_len: int | None = None
        self.max_sequence_length = 512

    # ---- encoders ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`prompt_embeds` `[N, max_sequence_length, D_t5]`: T5's last hidden state; `pooled_prompt_embeds` `[N, P]`:
        CLIP's pooled output (`pooler_output`, no projection), as `FluxPipeline.encode_prompt`."""
        clip_ids = self._token_ids(self.clip_tokenizer, prompts)
        pooled = self.clip_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self._token_ids(self.t5_tokenizer, prompts, max_length=self.max_sequence_length)
        return {
            "prompt_embeds": self.t5_encoder(t5_ids, output_hidden_states=False)[0],
            "pooled_prompt_embeds": pooled,
        }

    def check_cfg_branch(self, purpose: str) -> None:
        """Raise `GuidanceDistilledError` when `purpose` needs CFG's unconditional branch and the model has none."""
        if self.guidance_embeds:
            raise GuidanceDistilledError(
                f"{purpose} needs classifier-free guidance's unconditional branch, but this FLUX model is "
                "guidance-distilled (`guidance_embeds=True`, FLUX.1-dev): guidance is an input of the network and "
                "no unconditional prediction is ever made; use a model that samples with CFG"
            )

    @torch.no_grad()
    def unconditional_embeddings(self) -> dict[str, torch.Tensor]:
        """The encoded `""` (what `FluxPipeline`'s true CFG uses without a negative prompt); refused on a
        guidance-distilled model (`check_cfg_branch`)."""
        self.check_cfg_branch("the unconditional CFG branch")
        return self.encode_prompts([""])

    # ---- packing -------------------------------------------------------------------------------------------------
    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """`[N, C, h, w]` → `[N, (h/2)·(w/2), 4C]` tokens of 2x2 patches (`FluxPipeline._pack_latents`)."""
        n, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, n, c, h, w)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of `pack` for `h x w` latents (`FluxPipeline._unpack_latents`, which takes pixel sizes)."""
        f = self.vae_scale_factor
        return FluxPipeline._unpack_latents(tokens, h * f, w * f, f)

    def position_ids(self, h: int, w: int, text_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`img_ids` `[(h/2)·(w/2), 3]` = (0, patch row, patch column) and `txt_ids` `[text_len, 3]` = 0."""
        img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
        return img_ids, torch.zeros(text_len, 3, device=device, dtype=dtype)

    # ---- noising process -----------------------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t = σ·T (float32, on `self.device`) with σ drawn as in the module docstring (steps 1–2)."""
        u = draw_u(self, n, generator)
        return (self.shift_sigma(u) * self.num_train_timesteps).float().to(self.device)

    def shift_sigma(self, u: torch.Tensor) -> torch.Tensor:
        """σ from u: the resolution shift for `image_seq_len` when set, else the scheduler's training sigmas."""
        if self.image_seq_len is not None:
            mu = self.shift_mu(self.image_seq_len)
            return math.exp(mu) / (math.exp(mu) + (1 / u.clamp(min=1e-6) - 1))
        if self.dynamic_shift:
            return u
        return self.shift * u / (1 + (self.shift - 1) * u)

    def shift_mu(self, image_seq_len: int) -> float:
        """μ of `FluxPipeline`'s `calculate_shift` for `image_seq_len` packed tokens, from the scheduler config."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        return calculate_shift(
            image_seq_len,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )

    def sampling_sigmas(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        """The descending σ grid (ending with 0) `FluxPipeline` samples a `resolution`² image on in `num_steps` steps:
        σ = linspace(1, 1/n, n), shifted with μ for that image's packed tokens when the scheduler shifts dynamically.

        Raises:
            ValueError: dynamic shifting and no `resolution`.
        """
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        flow = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        mu = None
        if self.dynamic_shift:
            if resolution is None:
                raise ValueError("FLUX's σ grid shifts with the image size: pass `resolution` (pixels)")
            side = resolution // (2 * self.vae_scale_factor)
            mu = self.shift_mu(side * side)
        flow.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return flow.sigmas.float()

    # ---- the network ---------------------------------------------------------------------------------------------
    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity (ε − x0) estimate `[N, C, h, w]` in float32: pack, run the transformer at σ = t / T (with
        `guidance_scale` when the model embeds guidance), unpack."""
        net, dtype = self._net_and_dtype(denoiser)
        n, _, h, w = x_t.shape
        text = cond["prompt_embeds"].to(dtype)
        img_ids, txt_ids = self.position_ids(h, w, text.shape[1], x_t.device, dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((n,), self.guidance_scale, device=x_t.device, dtype=torch.float32)
        out = net(
            hidden_states=self.pack(x_t.to(dtype)),
            timestep=(t.float() / self.num_train_timesteps).to(x_t.device),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w).float()
