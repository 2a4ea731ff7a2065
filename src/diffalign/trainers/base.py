"""THE training loop. Method trainers only say how a batch becomes `(loss, stats)`.

The loop owns: accelerate (devices, DDP, mixed precision, trackers), the optimizer and LR schedule, gradient
accumulation and clipping, LoRA or full fine-tuning with the matching reference model, checkpoint/resume,
`metrics.jsonl`, callbacks (EMA, validation images) and the progress bar.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.backbones import load_backbone
from diffalign.backbones.attention import apply_attention, resolve_attention
from diffalign.config import TrainConfig
from diffalign.data import DataError, collate
from diffalign.objectives import per_sample_error
from diffalign.optional import require
from diffalign.trainers import checkpoint as ckpt
from diffalign.trainers.callbacks import Callback, EMACallback, HeldOutLossCallback, ValidationCallback
from diffalign.trainers.distributed import (
    OutputDirLock,
    check_engine,
    check_world_size,
    describe_launch,
    engine_name,
)
from diffalign.trainers.errors import (  # noqa: F401 (re-exported: callers catch the run failures from here)
    CheckpointWriteError,
    RunFailedError,
    TrainingDivergedError,
)
from diffalign.trainers.hardware import FROZEN_DTYPES, build_optimizer, resolve_mixed_precision, resolve_optimizer
from diffalign.trainers.offload import release_text_encoders
from diffalign.trainers.outputs import OutputsMixin
from diffalign.trainers.preemption import Preempted, stop_on_signals
from diffalign.trainers.quantization import quantize_base, resolve_base_quantization
from diffalign.trainers.sampling import StepBatchSampler, sample_generators, stream_positions
from diffalign.trainers.sharding import all_finite, check_sharded_run, first_non_finite, shard_reference
from diffalign.trainers.tracking import init_trackers

logger = logging.getLogger(__name__)


class Trainer(OutputsMixin, ABC):
    """Base of every method trainer.

    Subclasses set `method` and `config_class` and implement `build_dataset` and `compute_loss`; they use the
    helpers `latents`, `condition`, `timesteps`, `noise` and `errors`, which hide the backbone and the reference.
    """

    method: ClassVar[str]
    config_class: ClassVar[type[TrainConfig]] = TrainConfig

    def __init__(self, config: TrainConfig, callbacks: list[Callback] | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.callbacks = list(callbacks or [])
        self.global_step = 0
        self.sharded = False  # FSDP / ZeRO (set up by `setup`)
        self.skipped_samples = 0  # over all processes and the whole run (restored on resume)
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self.stream_offset = 0  # this process's micro-batches passed over (all images undecodable)
        self._empty_text: dict[str, torch.Tensor] | None = None

    # ---- what a method defines ----------------------------------------------------------------------------------
    @abstractmethod
    def build_dataset(self) -> Dataset:
        """The method's dataset (keys `(epoch, index)`, items as `diffalign.data` documents them)."""

    @abstractmethod
    def compute_loss(self, batch: dict, generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        """One micro-batch → `(loss, stats)`. `generators` holds one CPU generator per sample for t/ε/dropout."""

    def before_step(self, micro_batches: list[tuple[dict, list[int]]]) -> None:
        """Called once per optimizer step with its micro-batches and their stream positions, before any
        `compute_loss`: where a method computes statistics over the whole step (KTO's reference point)."""
        return None

    def make_sampler(self, start: int) -> StepBatchSampler:
        """This process's data order from micro-step `start` on (`trainers.sampling`); KTO may weight it."""
        cfg, acc, n = self.config, self.accelerator, len(self.dataset)
        return StepBatchSampler(n, cfg.batch_size, cfg.seed, start, acc.num_processes, acc.process_index)

    def build_dataset_from(self, data: str) -> Dataset:
        """The method's dataset over another table (held-out validation data), built as `build_dataset` builds the
        training one."""
        original = self.config
        self.config = original.model_copy(update={"data": data})
        try:
            return self.build_dataset()
        finally:
            self.config = original

    # ---- helpers for methods ------------------------------------------------------------------------------------
    def latents(self, batch: dict, suffixes: tuple[str, ...] = ("",)) -> torch.Tensor:
        """Latents of `batch["pixels<s>"]` (or cached `batch["latents<s>"]`) for each suffix, concatenated on dim 0."""
        device = self.accelerator.device
        parts = []
        for s in suffixes:
            if f"latents{s}" in batch:
                parts.append(batch[f"latents{s}"].to(device, torch.float32))
            else:
                with torch.no_grad():
                    pixels = batch[f"pixels{s}"].to(device, self.frozen_dtype)
                    parts.append(self.backbone.encode_images(pixels).float())
        return torch.cat(parts)

    def text_embeddings(self, batch: dict, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Prompt embeddings of the batch's captions; each is replaced by the empty prompt with probability
        `proportion_empty_prompts` (drawn from that sample's generator)."""
        p = self.config.proportion_empty_prompts
        drop = [bool(torch.rand(1, generator=g) < p) for g in generators] if p > 0 else [False] * len(generators)
        device = self.accelerator.device
        if "text" in batch:  # cached embeddings
            text = {k: v.to(device) for k, v in batch["text"].items()}
            if any(drop):
                empty = self.empty_text()
                mask = torch.tensor(drop, device=device)
                text = {k: torch.where(_bcast(mask, v), empty[k].to(v.dtype).expand_as(v), v) for k, v in text.items()}
            return text
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        with torch.no_grad():
            return self.backbone.encode_prompts(captions)

    def empty_text(self) -> dict[str, torch.Tensor]:
        if self._empty_text is None:
            with torch.no_grad():
                self._empty_text = self.backbone.encode_prompts([""])
        return self._empty_text

    def condition(
        self, batch: dict, text: dict[str, torch.Tensor], suffixes: tuple[str, ...] = ("",)
    ) -> dict[str, torch.Tensor]:
        """Conditioning for images concatenated in `suffixes` order, all sharing the batch's `text`."""
        device = self.accelerator.device
        repeated = {k: torch.cat([v] * len(suffixes)) for k, v in text.items()}
        sizes = [batch.get(f"original_size{s}") for s in suffixes]
        crops = [batch.get(f"crop_top_left{s}") for s in suffixes]
        original_size = torch.cat(sizes).to(device) if all(x is not None for x in sizes) else None
        crop_top_left = torch.cat(crops).to(device) if all(x is not None for x in crops) else None
        res = self.config.resolution
        return self.backbone.build_condition(repeated, original_size, crop_top_left, target_size=(res, res))

    def timesteps(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One training timestep per generator (per sample or per pair)."""
        t = torch.cat([self.backbone.sample_timesteps(1, generator=g) for g in generators])
        return t.to(self.accelerator.device)

    def noise(self, like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One standard-normal draw of `like[0]`'s shape per generator, stacked."""
        eps = torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators])
        return eps.to(like.device, like.dtype)

    def errors(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample errors `[N]` of the policy (with grad) and of the frozen reference (no grad)."""
        pred = self.backbone.predict(x_t, t, cond, denoiser=self.model)
        model_err = per_sample_error(pred, target)
        with torch.no_grad(), self.reference():
            ref_pred = self.backbone.predict(x_t, t, cond, denoiser=self.reference_model)
        return model_err, per_sample_error(ref_pred, target)

    @contextmanager
    def reference(self):
        """Inside: `self.reference_model` computes the reference. LoRA → the same network with adapters disabled;
        full fine-tune → the frozen copy made at start."""
        if self.ref_copy is not None:
            with self.accelerator.autocast():
                yield
            return
        self.denoiser.disable_adapters()
        try:
            with self.accelerator.autocast():
                yield
        finally:
            self.denoiser.enable_adapters()

    @property
    def reference_model(self) -> torch.nn.Module:
        return self.ref_copy if self.ref_copy is not None else self.denoiser

    # ---- setup --------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        precision = resolve_mixed_precision(cfg.mixed_precision, device_type)
        _fresh_accelerator_state()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir)),
        )
        if cfg.report_to != "none":
            require(cfg.report_to, f"`report_to: {cfg.report_to}`")
        check_world_size(self.accelerator)
        self.distributed_type = engine_name(self.accelerator.distributed_type)
        check_engine(self.distributed_type, lora=cfg.lora_rank > 0)
        self.sharded = self.distributed_type in ("FSDP", "DEEPSPEED")
        if self.sharded:
            check_sharded_run(self.accelerator, self.distributed_type, cfg)
        if cfg.push_to_hub:
            _check_hub_target(cfg)
        set_seed(cfg.seed)
        if cfg.allow_tf32 and device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        self.frozen_dtype = FROZEN_DTYPES[precision]
        self.backbone = load_backbone(cfg.model, frozen_dtype=self.frozen_dtype, variant=cfg.variant)
        self.attention = resolve_attention(cfg.attention, self.accelerator.device)
        apply_attention(self.backbone.denoiser, self.attention)
        self.denoiser = self.backbone.denoiser
        self.ref_copy = None
        if cfg.lora_rank > 0:
            # the frozen base weights are stored in the compute dtype (autocast would cast them on every forward;
            # SD1.5 LoRA, 8 pairs, bf16 on an H200: 0.407 → 0.380 s/step, 23.5 → 20.3 GiB); LoRA weights stay fp32
            if self.frozen_dtype != torch.float32:
                self.denoiser.to(self.frozen_dtype)
            targets = tuple(cfg.lora_target_modules) if cfg.lora_target_modules else None
            self.backbone.add_lora(cfg.lora_rank, cfg.lora_alpha, targets)
            quantization = resolve_base_quantization(cfg.base_quantization, device_type, self.sharded)
            quantize_base(self.denoiser, quantization)  # frozen base (= the reference) held in int8/fp8/nf4
        else:
            self.ref_copy = copy.deepcopy(self.denoiser).requires_grad_(False).eval().to(self.frozen_dtype)
            self.ref_copy.to(self.accelerator.device)
            self.denoiser.requires_grad_(True)
        # after the cast, LoRA and quantisation, done on the CPU: the device never holds the fp32 base of a LoRA run
        self.backbone.to(self.accelerator.device, self.frozen_dtype)
        if cfg.init_from and ckpt.resolve_resume(cfg.resume, self.output_dir) is None:  # the reference stays `model`
            loaded = ckpt.load_initial_weights(self.denoiser, cfg.init_from, cfg.lora_rank, cfg.lora_alpha)
            logger.info("init_from: starting from the %s", loaded)
        self.denoiser.train()
        if cfg.gradient_checkpointing:
            self.backbone.set_gradient_checkpointing(True)
        self.params = [p for p in self.denoiser.parameters() if p.requires_grad]
        for p in self.params:  # trainable weights stay fp32 master copies under mixed precision
            p.data = p.data.float()

        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr *= cfg.batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        cfg_lr = cfg.model_copy(update={"learning_rate": lr})
        self.optimizer_name = resolve_optimizer(cfg.optimizer, device_type)
        optimizer = build_optimizer(self.optimizer_name, self.params, cfg_lr)
        from diffusers.optimization import get_scheduler

        n = self.accelerator.num_processes
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * n, num_training_steps=cfg.max_steps * n
        )
        if self.distributed_type == "DEEPSPEED":  # no DataLoader goes through prepare(): tell DeepSpeed the batch
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.denoiser, optimizer, scheduler)
        if self.sharded:  # the engine replaced the parameters with shards: clip, check and EMA those
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            if self.ref_copy is not None:
                self.ref_copy = shard_reference(self.accelerator, self.distributed_type, self.ref_copy)
        self._register_checkpoint_hooks()
        if cfg.ema_decay:
            self.callbacks.append(EMACallback(cfg.ema_decay))
        if cfg.validation_steps and cfg.validation_data:
            self.callbacks.append(
                HeldOutLossCallback(cfg.validation_steps, cfg.validation_data, cfg.validation_max_samples)
            )
        if cfg.validation_steps and cfg.validation_prompts:
            self.callbacks.append(
                ValidationCallback(
                    cfg.validation_steps, cfg.validation_prompts, cfg.validation_seed, reward=cfg.validation_reward
                )
            )
        for cb in self.callbacks:
            cb.on_setup(self)

        self.dataset = self.build_dataset()
        if len(self.dataset) == 0:
            stats = getattr(self.dataset, "stats", None)
            raise DataError(
                f"no training samples left in {cfg.data!r} after filtering" + (f" ({_counts(stats)})" if stats else "")
            )
        if cfg.cache_latents:
            from diffalign.data.cache import encode_with_cache

            cache_dir = cfg.cache_dir or str(self.output_dir / "cache")
            with self.accelerator.main_process_first():  # the main process encodes; the others then read the cache
                self.dataset = encode_with_cache(
                    self.dataset,
                    self.backbone,
                    cache_dir,
                    batch_size=cfg.batch_size,
                    show_progress=self.accelerator.is_local_main_process,
                )
            if cfg.offload_text_encoders:  # every caption is cached: the text encoders are no longer needed
                empty = self.dataset.empty_text
                self._empty_text = release_text_encoders(self.backbone, empty, self.accelerator.device)

    def _register_checkpoint_hooks(self) -> None:
        """LoRA checkpoints hold only the trainable weights (MBs, not the whole UNet)."""
        lora = self.config.lora_rank > 0

        def save_hook(models, weights, output_dir):
            if lora and self.accelerator.is_main_process:
                from safetensors.torch import save_file

                state = {n: p.detach().contiguous() for n, p in self._named_trainable()}
                save_file(state, str(Path(output_dir) / "trainable.safetensors"))
                weights.clear()

        def load_hook(models, input_dir):
            if lora:
                from safetensors.torch import load_file

                state = load_file(str(Path(input_dir) / "trainable.safetensors"))
                named = dict(self._named_trainable())
                with torch.no_grad():
                    for name, value in state.items():
                        named[name].copy_(value)
                models.clear()

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def _named_trainable(self):
        return [(n, p) for n, p in self.denoiser.named_parameters() if p.requires_grad]

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run to `max_steps` (resuming if asked) and return the `final/` folder."""
        if not hasattr(self, "accelerator"):
            self.setup()
        acc = self.accelerator
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            from diffalign.config import ConfigError

            raise ConfigError(f"`output_dir` {str(self.output_dir)!r} cannot be created: {err.strerror}") from None
        lock = OutputDirLock(self.output_dir)
        if acc.is_main_process:
            lock.acquire()
            for orphan in ckpt.remove_orphans(self.output_dir):
                logger.info("removed an unfinished checkpoint folder %s (a save that was interrupted)", orphan)
        try:
            with stop_on_signals() as self._stop:
                return self._train()
        finally:
            lock.release()

    def _train(self) -> Path:
        cfg, acc = self.config, self.accelerator
        resume_from = ckpt.resolve_resume(cfg.resume, self.output_dir)
        if resume_from is not None:
            state = ckpt.read_state(resume_from)
            ckpt.check_layout(state, self._layout(), resume_from)
            ckpt.verify(resume_from)
            acc.load_state(str(resume_from))
            self.global_step = state["step"]
            self._restore_counters(state, resume_from)
            for cb in self.callbacks:
                cb.on_resume(self, resume_from)
            logger.info("resumed from %s at step %d", resume_from, self.global_step)
        elif cfg.resume == "latest":
            logger.info("`resume: latest` found no checkpoint in %s; starting from step 0", self.output_dir)
        self._log_banner()
        if acc.is_main_process:
            for log in ("metrics.jsonl", "validation.jsonl"):
                _truncate_metrics(self.output_dir / log, self.global_step)
            (self.output_dir / "config.yaml").write_text(self.config.to_yaml())  # what checkpoints were made with
            if cfg.report_to != "none":
                init_trackers(acc, cfg.tracker_project_name, cfg.model_dump(mode="json"), cfg.to_yaml())

        ga = cfg.gradient_accumulation_steps
        sampler = self.make_sampler(self.global_step * ga + self.stream_offset)
        loader = DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.dataloader_num_workers
        )
        batches = iter(loader)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.global_step,
            desc=f"train {self.method}",
            disable=not acc.is_local_main_process,
        )
        while self.global_step < cfg.max_steps:
            start = time.perf_counter()
            micro_stats: list[dict] = []
            self._skipped_this_step = 0
            micro_batches = [self._next_micro_batch(batches, self.global_step * ga + micro) for micro in range(ga)]
            self.before_step(micro_batches)
            for batch, positions in micro_batches:
                generators = sample_generators(cfg.seed, positions)
                with acc.accumulate(self.model):
                    loss, stats = self.compute_loss(batch, generators)
                    acc.backward(loss)  # also for a non-finite loss: every rank must join the gradient sync
                    grad_norm = None
                    applied = True
                    if acc.sync_gradients and cfg.max_grad_norm > 0:  # one norm both clips and checks
                        grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                        applied = bool(torch.isfinite(grad_norm))
                    elif acc.sync_gradients:
                        applied = self._gradients_finite()
                    if applied:
                        self.optimizer.step()
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro_stats.append({"loss": loss.detach(), **stats})
            self.global_step += 1
            self._count_nonfinite(applied)
            metrics, skipped = self._reduce(micro_stats, self._skipped_this_step)
            self.skipped_samples += skipped
            metrics.update(step=self.global_step, lr=self.lr_scheduler.get_last_lr()[0])
            metrics["skipped_samples"] = self.skipped_samples
            metrics["nonfinite_steps"] = self.nonfinite_steps
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics["sec_per_step"] = time.perf_counter() - start
            self._log(metrics)
            bar.update(1)
            postfix = {"loss": f"{metrics['loss']:.4f}"}
            if "implicit_acc" in metrics:
                postfix["acc"] = f"{metrics['implicit_acc']:.2f}"
            bar.set_postfix(postfix)
            for cb in self.callbacks:
                cb.on_step_end(self, self.global_step)
            saved = cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0
            if saved:
                self.save_checkpoint()
            signum = self._stop.agreed(acc)
            if signum:
                self._preempted(signum, already_saved=bool(saved))
        bar.close()
        if acc.is_main_process:
            logger.info(
                "run summary: %d steps | %d samples skipped (undecodable images) | %d steps skipped (non-finite)",
                self.global_step,
                self.skipped_samples,
                self.nonfinite_steps,
            )
        final = self.save_final()
        self._finish_trackers()
        return final

    def _next_micro_batch(self, batches, micro_step: int) -> tuple[dict, list[int]]:
        """The next micro-batch with at least one usable sample, and the stream positions of the samples it kept
        (they key each sample's timestep and noise). A micro-batch whose every image is undecodable is passed over:
        this process's stream moves one micro-batch further (`stream_offset`, saved in checkpoints, so a resume
        continues at the same sample). A whole pass without one usable sample stops the run."""
        cfg, acc = self.config, self.accelerator
        passed_over = 0
        while True:
            batch = next(batches)
            self._skipped_this_step += batch.pop("skipped")
            kept = batch.pop("kept")
            positions = stream_positions(
                micro_step + self.stream_offset, cfg.batch_size, acc.num_processes, acc.process_index
            )
            if kept:
                return batch, [positions[i] for i in kept]
            self.stream_offset += 1
            passed_over += cfg.batch_size
            if passed_over >= len(self.dataset):
                raise DataError(_unusable_message(self.dataset, cfg.data))

    def _restore_counters(self, state: dict, path: Path) -> None:
        """Counters that must survive a resume: samples and non-finite steps skipped so far, and each process's
        stream offset (micro-batches passed over because every image was undecodable)."""
        from diffalign.config import ConfigError

        acc = self.accelerator
        self.skipped_samples = state.get("skipped_samples", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        offsets = state.get("stream_offsets", [0])
        same_world = len(offsets) == acc.num_processes
        self.stream_offset = offsets[acc.process_index] if same_world else 0
        if not same_world and any(offsets):
            raise ConfigError(
                f"cannot resume {str(path)!r} on {acc.num_processes} processes: its {len(offsets)} processes passed "
                f"over different undecodable micro-batches (offsets {offsets}), so their sample streams no longer "
                f"line up; resume on {len(offsets)} processes"
            )

    def _reduce(self, micro_stats: list[dict], skipped: int) -> tuple[dict[str, float], int]:
        """Mean over micro-steps, then over processes: one record per optimizer step; and the samples `skipped` on
        every process, summed — one collective and one host read per step for both."""
        keys = micro_stats[0].keys()
        local = torch.stack(
            [torch.stack([torch.as_tensor(s[k], dtype=torch.float32) for s in micro_stats]).mean() for k in keys]
            + [torch.tensor(float(skipped))]
        )
        summed = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").cpu()
        n = self.accelerator.num_processes
        return {k: float(v) / n for k, v in zip(keys, summed[:-1])}, int(summed[-1])

    def _log(self, metrics: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.config.report_to != "none":
            self.accelerator.log(metrics, step=self.global_step)

    def _preempted(self, signum: int, already_saved: bool) -> None:
        """Save the step just finished (unless the schedule already did) and stop with `Preempted`."""
        path = self.output_dir / f"checkpoint-{self.global_step}" if already_saved else self.save_checkpoint()
        self._finish_trackers()
        name = signal.Signals(signum).name if signum in iter(signal.Signals) else str(signum)
        raise Preempted(
            signum,
            f"stopped by {name} after step {self.global_step}; saved {path} — continue with `--resume latest`",
        )

    def _check_weights_finite(self, what: str) -> None:
        """Never write exploded weights: a non-finite trainable weight stops the run before the save (on every
        rank: under sharding each checks its shard and they agree)."""
        bad = first_non_finite(self._named_trainable())
        if self.sharded:
            anywhere = self.accelerator.reduce(torch.tensor(float(bad is not None), device=self.accelerator.device))
            bad = bad or ("a sharded weight" if float(anywhere) > 0 else None)
        if bad is not None:
            self._finish_trackers()
            found = ckpt.list_checkpoints(self.output_dir)
            last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
            raise TrainingDivergedError(
                f"weight {bad!r} is not finite at step {self.global_step}: {what} not written; {last}"
            )

    def _gradients_finite(self) -> bool:
        """Without clipping: True when Σ g² over the trainable gradients is finite in fp32 (DDP has already averaged
        them: all ranks agree). Finite gradients whose squares overflow would turn Adam's second moment into inf and
        every later update into 0 (a run at β = 1e38 "trained" without moving), so they count as non-finite too.
        With clipping, the clip's total norm is checked instead (clipped gradients cannot overflow Adam)."""
        return all_finite(self.accelerator, [p.grad for p in self.params if p.grad is not None], self.sharded)

    def _count_nonfinite(self, applied: bool) -> None:
        """A step whose loss or gradients were not finite is skipped (weights unchanged) and counted; after
        `max_nonfinite_steps` in a row the run saves its (finite) state and stops."""
        self.nonfinite_steps += not applied
        self._nonfinite_run = 0 if applied else self._nonfinite_run + 1
        if not applied:
            logger.warning("step %d: non-finite loss or gradients, update skipped", self.global_step)
        if self._nonfinite_run >= self.config.max_nonfinite_steps:
            path = self.save_checkpoint()
            self._finish_trackers()
            raise TrainingDivergedError(
                f"{self._nonfinite_run} steps in a row (to step {self.global_step}) had a non-finite loss or "
                f"gradients and were skipped; the last finite weights are saved in {path}. Resume from it with a "
                "lower `learning_rate` or `beta`, or with `max_grad_norm` set."
            )

    def _finish_trackers(self) -> None:
        """`accelerator.end_training()` without destroying the process group: a process may train several runs in
        turn (notebooks, iterative loops, the multi-process tests); the CLI tears the group down at exit."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def _log_banner(self) -> None:
        cfg, acc = self.config, self.accelerator
        if not acc.is_main_process:
            return
        logger.info(describe_launch(acc, cfg.batch_size, cfg.gradient_accumulation_steps))
        n_train = sum(p.numel() for p in self.params)
        logger.info(
            "%s | %s (%s) | effective batch %d = %d per device x %d processes x %d accumulation | %d steps | "
            "precision %s | attention %s | optimizer %s | %s, %.2fM trainable params | dataset %d samples",
            self.method,
            cfg.model,
            self.backbone.family,
            cfg.batch_size * acc.num_processes * cfg.gradient_accumulation_steps,
            cfg.batch_size,
            acc.num_processes,
            cfg.gradient_accumulation_steps,
            cfg.max_steps,
            acc.mixed_precision,
            self.attention,
            self.optimizer_name,
            f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full fine-tune",
            n_train / 1e6,
            len(self.dataset),
        )

    def _layout(self) -> dict:
        """How samples map to steps; a resume must keep the global micro-batch and the accumulation."""
        acc = self.accelerator
        cfg = self.config
        return {
            "world_size": acc.num_processes,
            "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "method": self.method,
            "model": cfg.model,
            "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_target_modules": cfg.lora_target_modules,
        }


def _fresh_accelerator_state() -> None:
    """accelerate keeps its state in process-wide singletons; in a single process (tests, the demo, notebooks) a
    second run with another precision or accumulation would be refused. Multi-process launches are left alone."""
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _check_hub_target(cfg: TrainConfig) -> None:
    """`push_to_hub` needs a repo id and a reachable Hub: checked before training, not after hours of it."""
    from diffalign.backbones.base import hub_offline
    from diffalign.config import ConfigError

    if not cfg.hub_model_id:
        raise ConfigError("`push_to_hub` is set but `hub_model_id` is not; pass `--hub_model_id me/my-model`")
    if hub_offline():
        raise ConfigError(f"`push_to_hub` to {cfg.hub_model_id!r} needs the Hub, but HF_HUB_OFFLINE is set")


def _unusable_message(dataset, source: str) -> str:
    """'0 of N rows usable: …, first at row R, column C' for a table whose every image failed to decode."""
    n = len(dataset)
    first = getattr(dataset, "first_undecodable", None) or getattr(
        getattr(dataset, "base", None), "first_undecodable", None
    )
    where = f", first seen at row {first[0]}, column {first[1]!r}" if first else ""
    return f"0 of {n} rows of {source!r} usable: every sample has an undecodable image{where}"


def _counts(stats: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items())


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so metrics.jsonl has one line per step."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
