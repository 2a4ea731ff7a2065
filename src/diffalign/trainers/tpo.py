"""TPO (TDPO, TKTO): prefer an image's own caption over a perturbed one; image-caption data, no image pairs.

Xian et al. 2025, "Free Lunch Alignment of Text-to-Image Diffusion Models without Preference Image Pairs": the
preference is between two CAPTIONS of one image instead of between two images of one caption.

Data: (image x, matched caption c_w, mismatched caption c_l), e.g. `diffalign perturb` output, read with
`CaptionedImages(data, extra_columns=("mismatched_caption",))`. One micro-batch of B items = 2B denoiser rows: the
image's latent is encoded once and used twice, with the SAME t and ε; only the caption differs.

- TDPO: Diffusion-DPO (`objectives.dpo_loss`) with winner = (x, c_w), loser = (x, c_l):
  `inside = −½β((m(x,c_w) − m(x,c_l)) − (r(x,c_w) − r(x,c_l)))`, `loss = −log σ(inside)`.
- TKTO: Diffusion-KTO (`objectives.kto_loss`) with (x, c_w) desirable and (x, c_l) undesirable.
- `negative_clip` c (optional, off by default): the policy error on (x, c_l) counts at most (1 + c)× the reference's,
  m̃_l = min(m_l, (1 + c)·r_l) (`objectives.bound_negative_error`). The paper's clipping of the negative term is
  unpublished; this form is diffalign's choice.

Empty-prompt dropout is refused (`proportion_empty_prompts` must be 0): dropping one caption would turn the pair
into "caption vs. nothing", dropping both makes the two rows identical (loss log 2, zero gradient).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from diffalign.config import TrainConfig
from diffalign.data import CaptionedImages
from diffalign.objectives import bound_negative_error, dpo_loss, kto_loss
from diffalign.trainers.base import Trainer
from diffalign.trainers.dpo import DPOConfig
from diffalign.trainers.kto import KTOConfig, KTOTrainer


class TPOFields(TrainConfig):
    """Keys shared by TDPO and TKTO."""

    image_column: str = Field("image", description="Image column of the data (`diffalign perturb` writes `image`).")
    mismatched_column: str = Field("mismatched_caption", description="Column holding the mismatched caption c_l.")
    negative_clip: float | None = Field(
        None,
        ge=0,
        description="Bound c on the perturbed-caption term: the policy's error on (x, c_l) enters the loss as "
        "min(m, (1 + c)·r), a fraction c above the reference's at most (null = off). diffalign's form; the TPO "
        "paper's clipping is not public.",
    )

    @field_validator("proportion_empty_prompts")
    @classmethod
    def _no_caption_dropout(cls, v: float) -> float:
        if v != 0:
            raise ValueError(
                f"`proportion_empty_prompts` must be 0 for TPO, got {v}: TPO compares two captions of one image, and "
                "an empty prompt on both sides makes the pair identical (zero gradient)"
            )
        return v


class TDPOConfig(TPOFields, DPOConfig):
    """TDPO. β in Diffusion-DPO's official convention (with the ½); default 5000 as Diffusion-DPO's SD1.5/SDXL
    launchers (TPO builds on that recipe; the diffusers script's β = 2500 equals 5000 here)."""


class TKTOConfig(TPOFields, KTOConfig):
    """TKTO. β as Diffusion-KTO (no ½ factor), default 5000."""

    shared_noise: bool = Field(
        True,
        description="Desirable and undesirable rows of an image share t and ε (False: one draw each, as in KTO).",
    )


class _TPOMixin:
    """Data and conditioning shared by the two TPO trainers."""

    def build_dataset(self):
        cfg = self.config
        return CaptionedImages(
            cfg.data,
            resolution=cfg.resolution,
            center_crop=cfg.center_crop,
            random_flip=cfg.random_flip,
            seed=cfg.seed,
            caption_column=cfg.caption_column,
            image_column=cfg.image_column,
            extra_columns=(cfg.mismatched_column,),
        )

    def caption_pair_condition(self, batch: dict) -> dict[str, torch.Tensor]:
        """Condition for `[x; x]`: rows `0..B−1` under c_w, rows `B..2B−1` under c_l (SDXL micro-conditioning of
        the image repeated). Cached c_w embeddings (`batch["text"]`) are used when present."""
        mismatched = list(batch[self.config.mismatched_column])
        device = self.accelerator.device
        with torch.no_grad():
            if "text" in batch:
                matched = {k: v.to(device) for k, v in batch["text"].items()}
                other = self.backbone.encode_prompts(mismatched)
                text = {k: torch.cat([matched[k], other[k].to(matched[k].dtype)]) for k in matched}
            else:
                text = self.backbone.encode_prompts(list(batch["caption"]) + mismatched)
        view = {k: torch.cat([batch[k]] * 2) for k in ("original_size", "crop_top_left") if k in batch}
        return self.condition(view, text)


class TDPOTrainer(_TPOMixin, Trainer):
    """TDPO: each item is one image scored under its matched caption (winner) and its mismatched caption (loser),
    with one t and one ε per item shared by both rows; the reference sees exactly the same inputs."""

    method = "tdpo"
    config_class = TDPOConfig

    def compute_loss(self, batch: dict, generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        x0 = self.latents(batch)  # [B, C, h, w], encoded once
        t = self.timesteps(generators)
        eps = self.noise(x0, generators)
        x_t = self.backbone.add_noise(x0, eps, t)
        target = self.backbone.training_target(x0, eps, t)
        cond = self.caption_pair_condition(batch)
        model_err, ref_err = self.errors(torch.cat([x_t, x_t]), t.repeat(2), cond, torch.cat([target, target]))
        m_w, m_l = model_err.chunk(2)
        r_w, r_l = ref_err.chunk(2)
        m_l, clip_stats = bound_negative_error(m_l, r_l, self.config.negative_clip)
        loss, stats = dpo_loss(m_w, m_l, r_w, r_l, self.config.beta)
        return loss, {**stats, **clip_stats}


class TKTOTrainer(_TPOMixin, KTOTrainer):
    """TKTO: rows `0..B−1` = (image, matched caption), desirable; rows `B..2B−1` = (same image, mismatched caption),
    undesirable. `kl = clamp(mean(r − m), 0)` over all 2B rows of the step (`kl_scope`, as KTO). With
    `shared_noise` (default) both rows of an image share t and ε, so identical captions give loss ½ and no
    gradient."""

    method = "tkto"
    config_class = TKTOConfig

    def compute_loss(self, batch: dict, generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        x0 = self.latents(batch)  # [B, C, h, w], encoded once
        t = self.timesteps(generators)
        eps = self.noise(x0, generators)
        if self.config.shared_noise:
            t, eps = t.repeat(2), torch.cat([eps, eps])
        else:  # a second draw from each item's generator, after the first
            t, eps = torch.cat([t, self.timesteps(generators)]), torch.cat([eps, self.noise(x0, generators)])
        x0 = torch.cat([x0, x0])
        x_t = self.backbone.add_noise(x0, eps, t)
        target = self.backbone.training_target(x0, eps, t)
        model_err, ref_err = self.errors(x_t, t, self.caption_pair_condition(batch), target)
        desirable = torch.arange(len(x0), device=model_err.device) < len(x0) // 2
        model_err, clip_stats = bound_negative_error(model_err, ref_err, self.config.negative_clip, ~desirable)
        loss, stats = kto_loss(
            model_err,
            ref_err,
            desirable,
            self.config.beta,
            kl=self.kl_point(ref_err - model_err),
            desirable_weight=self.config.desirable_weight,
            undesirable_weight=self.config.undesirable_weight,
        )
        return loss, {**stats, **clip_stats}
