"""Diffusion-KTO (Li et al. 2024): unpaired images flagged desirable/undesirable, `objectives.kto_loss`."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from diffalign.config import ConfigError, TrainConfig
from diffalign.data import UnpairedImages
from diffalign.objectives import kto_loss
from diffalign.trainers.base import Trainer
from diffalign.trainers.distributed import global_mean
from diffalign.trainers.sampling import StepBatchSampler, WeightedStepBatchSampler, sample_generators

logger = logging.getLogger(__name__)


class KTOConfig(TrainConfig):
    """Diffusion-KTO. No ½ factor in β (unlike DPO). The official code (`train_kto_sd_v1.5.py`, `exps/example.sh`)
    runs β = 1000 (its default), lr 1e-7, full fine-tune, per-image labels drawn 80 % desirable
    (`desirable_ratio: 0.8`): the `sd15_kto` preset. The defaults here keep β = 5000 and the plain data order."""

    beta: float = Field(5000.0, gt=0, description="β of Diffusion-KTO (no ½ factor).")
    desirable_weight: float = Field(1.0, gt=0, description="λ_D, loss weight of desirable images.")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U, loss weight of undesirable images.")
    desirable_ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Draw each sample desirable with this probability, then uniformly within its class (the official "
        "code's weighted sampler, `--positive_ratio 0.8`); null = the plain shuffled order of the data.",
    )
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

    def make_sampler(self, start: int) -> StepBatchSampler:
        """With `desirable_ratio`, a `WeightedStepBatchSampler` over the data's desirable flags (still keyed by
        stream position: resume and batch layouts are unaffected); otherwise the plain order."""
        cfg, acc = self.config, self.accelerator
        if cfg.desirable_ratio is None:
            return super().make_sampler(start)
        data = getattr(self.dataset, "dataset", self.dataset)  # the source under a latent cache
        flags = getattr(data, "desirable_flags", None)
        if flags is None:
            raise ConfigError(
                f"`desirable_ratio` needs a dataset with per-image desirable flags, got {type(data).__name__}; "
                "set `desirable_ratio: null`"
            )
        logger.info("kto: weighted sampler, P(desirable) = %g over %d/%d desirable", cfg.desirable_ratio, flags.sum(),
                    len(flags))  # fmt: skip
        return WeightedStepBatchSampler(
            flags, cfg.desirable_ratio, cfg.batch_size, cfg.seed, start, acc.num_processes, acc.process_index
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
