"""Diffusion-KTO (Li et al. 2024): unpaired images flagged desirable/undesirable, `objectives.kto_loss`."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from diffalign.config import TrainConfig
from diffalign.data import UnpairedImages
from diffalign.objectives import kto_loss
from diffalign.trainers.base import Trainer
from diffalign.trainers.distributed import global_mean
from diffalign.trainers.sampling import sample_generators


class KTOConfig(TrainConfig):
    """Diffusion-KTO. Paper defaults: β = 5000, lr 1e-7, full fine-tune. No ½ factor in β (unlike DPO)."""

    beta: float = Field(5000.0, gt=0, description="β of Diffusion-KTO (no ½ factor).")
    desirable_weight: float = Field(1.0, gt=0, description="λ_D, loss weight of desirable images.")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U, loss weight of undesirable images.")
    kl_scope: Literal["step", "micro_batch"] = Field(
        "step",
        description="Batch the KL reference point is averaged over: `step` = every image of the optimizer step on "
        "every process (the same update at any batch × accumulation × processes layout; costs one extra no-grad "
        "pass when accumulating); `micro_batch` = each micro-batch over the processes (the official code).",
    )


class KTOTrainer(Trainer):
    """Every image has its own t and ε. The reference point `kl = clamp(mean(r − m), 0)` is detached and averaged
    over the whole optimizer step (`kl_scope: step`, default: all micro-batches of all processes, so 1×4, 1×2 with
    accumulation 2 and 2 processes × 2 give the same update) or, as the official code does, over each micro-batch
    of all processes (`kl_scope: micro_batch`: the official `accelerator.reduce(g.mean(), "mean")` per micro-step)."""

    method = "kto"
    config_class = KTOConfig
    _step_kl: torch.Tensor | None = None
    _kl_sink: list[torch.Tensor] | None = None

    def build_dataset(self):
        cfg = self.config
        return UnpairedImages(
            cfg.data,
            resolution=cfg.resolution,
            center_crop=cfg.center_crop,
            random_flip=cfg.random_flip,
            seed=cfg.seed,
            caption_column=cfg.caption_column,
        )

    def compute_loss(self, batch: dict, generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        x0 = self.latents(batch)
        cond = self.condition(batch, self.text_embeddings(batch, generators))
        t = self.timesteps(generators)
        eps = self.noise(x0, generators)
        x_t = self.backbone.add_noise(x0, eps, t)
        target = self.backbone.training_target(x0, eps, t)
        model_err, ref_err = self.errors(x_t, t, cond, target)
        desirable = batch["desirable"].to(model_err.device)
        return kto_loss(
            model_err,
            ref_err,
            desirable,
            self.config.beta,
            kl=self.kl_point(ref_err - model_err),
            desirable_weight=self.config.desirable_weight,
            undesirable_weight=self.config.undesirable_weight,
        )

    def before_step(self, micro_batches: list[tuple[dict, list[int]]]) -> None:
        """With `kl_scope: step` and accumulation, a no-grad pass over the step's micro-batches collects r − m of
        every image, reduced over processes into the step's reference point."""
        self._step_kl = None
        if self.config.kl_scope != "step" or len(micro_batches) == 1:
            return
        self._kl_sink = []
        try:
            with torch.no_grad():
                for batch, positions in micro_batches:
                    self.compute_loss(batch, sample_generators(self.config.seed, positions))
        finally:
            g, self._kl_sink = torch.cat(self._kl_sink), None
        self._step_kl = global_mean(self.accelerator, g).clamp(min=0)

    def kl_point(self, g: torch.Tensor) -> torch.Tensor:
        """The detached reference point for per-image `g = r − m` of this micro-batch (see the class docstring)."""
        g = g.detach()
        if self._kl_sink is not None:  # statistics pass of `before_step`
            self._kl_sink.append(g)
            return torch.zeros((), device=g.device)
        if self._step_kl is not None:
            return self._step_kl
        return global_mean(self.accelerator, g).clamp(min=0)
