"""SD3 family: CLIP-L + CLIP-G + (optional) T5 text encoders, an MMDiT (`SD3Transformer2DModel`), rectified flow.

Noising process (Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 1 with the RF choice of sec. 2):

    x_σ = (1 − σ)·x0 + σ·ε,        σ ∈ [0, 1]

and the transformer regresses the velocity v = dx_σ/dσ = ε − x0. Training σ (sec. 3.1 and 5.3.2):
    1. u ~ logit-normal(m, s): u = sigmoid(n), n ~ N(m, s²)   (default m = 0, s = 1; or u ~ U(0, 1))
    2. σ = shift·u / (1 + (shift − 1)·u)                      (`shift` of the pipeline's scheduler, 3.0 for SD3)
The denoiser's timestep is t = σ·T with T = `num_train_timesteps` (1000), as the pipeline feeds it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import StableDiffusion3Pipeline
from torch import nn

from diffalign.backbones.base import PipelineBackbone

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


class SD3Backbone(PipelineBackbone):
    """SD3 / SD3.5 (`StableDiffusion3Pipeline` folders).

    Attributes:
        timestep_sampling (`str`, defaults to `"logit_normal"`): how u is drawn, `"logit_normal"` or `"uniform"`.
        logit_mean, logit_std (`float`, default 0.0 and 1.0): parameters of the logit-normal.
        max_sequence_length (`int`, defaults to 256): T5 tokens (the pipeline's default); the sequence fed to the
            transformer is CLIP tokens + `max_sequence_length`.
        shift (`float`): σ shift from the scheduler config.
    """

    family: ClassVar[str] = "sd3"
    denoiser_subfolder: ClassVar[str] = "transformer"
    pipeline_class: ClassVar[type] = StableDiffusion3Pipeline
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"

    def __init__(self, pipe, frozen_dtype: torch.dtype = torch.float32):
        super().__init__(pipe, frozen_dtype)
        self.clip_encoders = [self.components["text_encoder"], self.components["text_encoder_2"]]
        self.clip_tokenizers = [self.components["tokenizer"], self.components["tokenizer_2"]]
        self.t5_encoder = self.components.get("text_encoder_3")
        self.t5_tokenizer = self.components.get("tokenizer_3")
        self.prediction_type = "flow_matching"
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.shift = float(self.scheduler.config.get("shift", 1.0))
        self.timestep_sampling = "logit_normal"
        self.logit_mean, self.logit_std = 0.0, 1.0
        self.max_sequence_length = 256

    # ---- encoders ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`prompt_embeds` `[N, L_clip + max_sequence_length, D_t5]`: [CLIP-L ‖ CLIP-G] penultimate hidden states
        (feature concat, zero-padded to the T5 width), then the T5 tokens on the sequence axis (zeros when T5 is
        absent, as diffusers does); `pooled_prompt_embeds` `[N, P_L + P_G]`: both projected pooled outputs."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])  # text_embeds [N, P]
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5_embeds(prompts, clip.dtype)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5_embeds(self, prompts: list[str], dtype: torch.dtype) -> torch.Tensor:
        if self.t5_encoder is None:
            width = self.denoiser.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device, dtype=dtype)
        ids = self._token_ids(self.t5_tokenizer, prompts, max_length=self.max_sequence_length)
        return self.t5_encoder(ids)[0]

    # ---- noising process -----------------------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t = σ·T (float32, on `self.device`) with σ drawn as in the module docstring (steps 1–2)."""
        u = draw_u(self, n, generator)
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return (sigma * self.num_train_timesteps).float().to(self.device)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) = (1 − σ, σ) with σ = t / T, float32 `[N]` on `t.device`."""
        sigma = t.float() / self.num_train_timesteps
        return 1 - sigma, sigma

    # ---- the network ---------------------------------------------------------------------------------------------
    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity (ε − x0) estimate in float32; inputs cast to the network's dtype."""
        net, dtype = self._net_and_dtype(denoiser)
        out = net(
            hidden_states=x_t.to(dtype),
            timestep=t.to(x_t.device),  # float32: the sinusoidal embedding is computed in fp32 anyway
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return out.float()


def draw_u(backbone, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """u ∈ (0, 1) for rectified-flow timesteps (SD3 and FLUX): logit-normal (`u = sigmoid(n)`, n ~ N(m, s²), Esser et
    al. 2024 sec. 3.1) or uniform, per `backbone.timestep_sampling`, `logit_mean`, `logit_std`."""
    device = generator.device if generator is not None else backbone.device
    if backbone.timestep_sampling == "logit_normal":
        normal = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(normal * backbone.logit_std + backbone.logit_mean)
    if backbone.timestep_sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(
        f"`timestep_sampling` must be one of {list(TIMESTEP_SAMPLINGS)}, got {backbone.timestep_sampling!r}"
    )
