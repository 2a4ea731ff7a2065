"""Optional behaviour of the loop as small callbacks (like trl's `SyncRefModelCallback`)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


class TrainerLike(Protocol):
    """What callbacks use of `diffalign.trainers.base.Trainer` (a Protocol, so this module never imports it)."""

    config: Any
    accelerator: Any
    backbone: Any
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    sharded: bool  # FSDP / ZeRO: `params` are this process's shards
    output_dir: Path
    reference_model: torch.nn.Module

    def reference(self): ...

    def build_dataset_from(self, data: str): ...

    def compute_loss(self, batch: dict, generators: list): ...


class Callback:
    """Hooks called by `Trainer.train`; every method is optional."""

    def on_setup(self, trainer: TrainerLike) -> None: ...

    def on_step_end(self, trainer: TrainerLike, step: int) -> None: ...

    def on_save(self, trainer: TrainerLike, checkpoint_dir: Path) -> None:
        """Called on every process before the checkpoint folder is renamed into place: write per-process files, or
        shared ones from the main process only."""

    def on_resume(self, trainer: TrainerLike, checkpoint_dir: Path) -> None: ...


class EMACallback(Callback):
    """Exponential moving average of the trainable weights, `θ_ema ← d·θ_ema + (1 − d)·θ` after every optimizer
    step (diffusers' `EMAModel`); saved in checkpoints and swapped in for `final/`."""

    def __init__(self, decay: float):
        self.decay = decay

    def on_setup(self, trainer: TrainerLike) -> None:
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(trainer.params, decay=self.decay, use_ema_warmup=False)

    def on_step_end(self, trainer: TrainerLike, step: int) -> None:
        self.ema.step(trainer.params)

    def on_save(self, trainer: TrainerLike, checkpoint_dir: Path) -> None:
        acc = trainer.accelerator
        if trainer.sharded:  # each process holds the EMA of its own shards
            state = {**self.ema.state_dict(), "shadow_params": [_local(p).clone() for p in self.ema.shadow_params]}
            torch.save(state, checkpoint_dir / f"ema-rank{acc.process_index}.pt")
        elif acc.is_main_process:
            torch.save(self.ema.state_dict(), checkpoint_dir / "ema.pt")

    def on_resume(self, trainer: TrainerLike, checkpoint_dir: Path) -> None:
        if not trainer.sharded:
            self.ema.load_state_dict(torch.load(checkpoint_dir / "ema.pt", weights_only=True))
            return
        state = torch.load(checkpoint_dir / f"ema-rank{trainer.accelerator.process_index}.pt", weights_only=True)
        saved = state.pop("shadow_params")
        self.ema.load_state_dict({**state, "shadow_params": self.ema.shadow_params})
        with torch.no_grad():
            for shadow, value in zip(self.ema.shadow_params, saved):
                _local(shadow).copy_(value)

    @contextmanager
    def swapped(self, params: list[torch.nn.Parameter]):
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a DTensor under FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class ValidationCallback(Callback):
    """Every `every` steps, on the main process: sample `prompts` with fixed seeds through a stock pipeline with the
    current weights and, once, with the base (LoRA adapters disabled, or the frozen reference of a full fine-tune);
    write `validation/step-<step>.png` (rows = prompts, columns = base | step) and log both to the trackers
    (`val/base`, `val/current`). With a `reward` (a `diffalign.rewards` spec), also log `val/reward` (mean over the
    current images) and `val/reward_base` and append them to `validation.jsonl`.

    Sampling uses its own seeded generators, so the training stream (per-sample generators) is untouched: a run with
    validation trains exactly as one without.
    """

    def __init__(self, every: int, prompts: list[str], seed: int = 0, reward: str | dict | None = None):
        self.every, self.prompts, self.seed, self.reward_spec = every, prompts, seed, reward
        self._base_images: list | None = None
        self._base_reward: float | None = None
        self._reward = None

    def on_step_end(self, trainer: TrainerLike, step: int) -> None:
        if step % self.every or not trainer.accelerator.is_main_process:
            return
        from diffalign.evaluation.report import image_grid

        if self._base_images is None:
            with trainer.reference():
                self._base_images = self._sample(trainer, trainer.reference_model)
        images = self._sample(trainer, trainer.accelerator.unwrap_model(trainer.model))
        out = trainer.output_dir / "validation" / f"step-{step:06d}.png"
        image_grid([[b, c] for b, c in zip(self._base_images, images)], self.prompts, ["base", f"step {step}"], out)
        logger.info("validation images: %s", out)
        if trainer.config.report_to != "none":
            from diffalign.trainers.tracking import log_images

            log_images(trainer.accelerator, {"val/base": self._base_images, "val/current": images}, step, self.prompts)
        if self.reward_spec is not None:
            self._log_reward(trainer, images, step)

    def _sample(self, trainer: TrainerLike, denoiser: torch.nn.Module) -> list:
        cfg = trainer.config
        pipe = trainer.backbone.make_pipeline(denoiser=denoiser)
        was_training = denoiser.training
        denoiser.eval()
        generators = [torch.Generator().manual_seed(self.seed + i) for i in range(len(self.prompts))]
        with torch.no_grad(), trainer.accelerator.autocast():
            images = pipe(
                self.prompts,
                num_inference_steps=cfg.validation_num_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=generators,
            ).images
        denoiser.train(was_training)
        return images

    def _log_reward(self, trainer: TrainerLike, images: list, step: int) -> None:
        from diffalign.rewards import create, parse_spec

        if self._reward is None:
            _, name, kwargs = parse_spec(self.reward_spec)
            self._reward = create(name, **kwargs)
            self._base_reward = float(self._reward(self._base_images, self.prompts).float().mean())
        value = float(self._reward(images, self.prompts).float().mean())
        record_validation(trainer, step, {"val/reward": value, "val/reward_base": self._base_reward})


class HeldOutLossCallback(Callback):
    """Every `every` steps, on the main process: the method's own loss and stats (`implicit_acc`, `reward_margin`,
    …) on up to `max_samples` rows of a held-out table in the training data's format, with fixed t/ε draws (the same
    every time, so the curve compares like with like), under no grad. Logged as `val/<stat>` to the trackers and
    `validation.jsonl`. `implicit_acc` is the fraction of held-out pairs whose implicit reward margin
    −½β((m_w − m_l) − (r_w − r_l)) is positive (DPO-family methods)."""

    SEED_OFFSET = 7_777_777  # keeps the held-out draws apart from any training sample's stream

    def __init__(self, every: int, data: str, max_samples: int = 256):
        self.every, self.data, self.max_samples = every, data, max_samples
        self._dataset = None

    def on_step_end(self, trainer: TrainerLike, step: int) -> None:
        if step % self.every or not trainer.accelerator.is_main_process:
            return
        from diffalign.data import collate
        from diffalign.trainers.sampling import sample_generators

        if self._dataset is None:
            self._dataset = trainer.build_dataset_from(self.data)
        n = min(len(self._dataset), self.max_samples)
        size = trainer.config.batch_size
        totals: dict[str, float] = {}
        count = 0
        wrapped = trainer.model
        trainer.model = trainer.accelerator.unwrap_model(wrapped)  # main process only: no collective ops
        try:
            with torch.no_grad(), trainer.accelerator.autocast():
                for start in range(0, n, size):
                    batch = collate([self._dataset[(0, i)] for i in range(start, min(start + size, n))])
                    batch.pop("skipped")
                    positions = [self.SEED_OFFSET + start + i for i in batch.pop("kept")]
                    rows = len(positions)
                    if not rows:  # every image of this batch was undecodable
                        continue
                    loss, stats = trainer.compute_loss(batch, sample_generators(trainer.config.seed, positions))
                    for key, value in {"loss": loss, **stats}.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * rows
                    count += rows
        finally:
            trainer.model = wrapped
        record_validation(trainer, step, {f"val/{k}": v / count for k, v in totals.items()})


def record_validation(trainer: TrainerLike, step: int, values: dict[str, float]) -> None:
    """Append `{"step", **values}` to `validation.jsonl`, log it to the trackers and the console."""
    import json

    with open(trainer.output_dir / "validation.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
    if trainer.config.report_to != "none":
        trainer.accelerator.log(values, step=step)
    logger.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
