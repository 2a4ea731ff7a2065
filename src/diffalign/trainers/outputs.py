"""What a run writes: resumable `checkpoint-<step>/` folders (atomic, with a manifest, on every process's part) and
`final/` (a LoRA in diffusers format or a stock model folder, gathered first under FSDP / ZeRO-3). A mixin of
`Trainer`: it uses the trainer's accelerator, callbacks, layout and counters."""

from __future__ import annotations

import errno
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from diffalign.trainers import checkpoint as ckpt
from diffalign.trainers.callbacks import EMACallback
from diffalign.trainers.errors import CheckpointWriteError

logger = logging.getLogger(__name__)


class OutputsMixin:
    """`save_checkpoint`, `save_final` and their helpers (see the module docstring)."""

    def save_checkpoint(self) -> Path | None:
        """`checkpoint-<step>/`: weights (LoRA: trainable only), optimizer, scheduler, callbacks' state."""
        acc = self.accelerator
        self._check_weights_finite("checkpoint")
        final = self.output_dir / f"checkpoint-{self.global_step}"
        tmp = self.output_dir / f".tmp-checkpoint-{self.global_step}"
        offsets = acc.gather(torch.tensor([self.stream_offset], device=acc.device)).tolist()
        state = {
            "step": self.global_step,
            "method": self.method,
            "skipped_samples": self.skipped_samples,
            "nonfinite_steps": self.nonfinite_steps,
            "stream_offsets": offsets,
        }
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            for cb in self.callbacks:
                cb.on_save(self, tmp)
            acc.wait_for_everyone()  # every rank has written its files into tmp before rank 0 renames it
            if acc.is_main_process:
                ckpt.finalize(tmp, final, {**state, **self._layout()})
        except OSError as err:
            self._checkpoint_write_failed(tmp, err)
        if acc.is_main_process:
            for old in ckpt.prune(self.output_dir, self.config.checkpoints_total_limit):
                logger.info("removed old checkpoint %s", old)
        acc.wait_for_everyone()
        return final

    def _checkpoint_write_failed(self, tmp: Path, err: OSError) -> None:
        """Remove the half-written folder and stop with one line naming the path, the cause and the intact
        previous checkpoint."""
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        found = ckpt.list_checkpoints(self.output_dir)
        previous = f"the previous checkpoint {found[-1]} is intact" if found else "no earlier checkpoint exists"
        cause = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        self._finish_trackers()
        raise CheckpointWriteError(
            f"writing checkpoint-{self.global_step} to {str(tmp.parent)!r} failed: {cause}; {previous} — free space "
            "and continue with `--resume latest`"
        ) from None

    def save_final(self) -> Path:
        """`final/`: LoRA in diffusers format or `save_pretrained` weights, plus the resolved config."""
        acc = self.accelerator
        self._check_weights_finite("final/")
        acc.wait_for_everyone()
        final = self.output_dir / "final"
        with self._final_weights():  # every rank swaps in its (part of the) EMA weights
            # FSDP / ZeRO-3 hold shards: every rank takes part in gathering the full state dict, the main one writes
            gathered = acc.get_state_dict(self.model) if self.sharded else None
            if acc.is_main_process:
                final.mkdir(parents=True, exist_ok=True)
                if gathered is not None:
                    self._save_gathered(final, gathered)
                elif self.config.lora_rank > 0:
                    self.backbone.save_lora(final, denoiser=acc.unwrap_model(self.model))
                else:
                    self.backbone.save_full(final, denoiser=acc.unwrap_model(self.model))
        if acc.is_main_process:
            (final / "config.yaml").write_text(self.config.to_yaml())
            (final / "run.json").write_text(json.dumps({"method": self.method, "step": self.global_step}))
            if self.config.push_to_hub:
                from diffalign.export import publish_run

                logger.info("pushed %s", publish_run(self.output_dir, self.config.hub_model_id))
            logger.info("saved %s", final)
        acc.wait_for_everyone()  # no rank leaves (and tears the process group down) while the main one still writes
        return final

    def _save_gathered(self, final: Path, state: dict[str, torch.Tensor]) -> Path:
        """A gathered full state dict as a stock diffusers model folder (`config.json` + safetensors shards named as
        `save_pretrained` names them), so `UNet2DConditionModel.from_pretrained(final / "unet")` loads it."""
        from huggingface_hub import save_torch_state_dict

        folder = final / self.backbone.denoiser_subfolder
        folder.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.save_config(folder)
        stock = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))  # FSDP2 renames the class
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_class_name": stock.__name__}, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        return folder

    @contextmanager
    def _final_weights(self):
        """Swap in EMA weights for saving when an EMA callback is active."""
        ema = next((cb for cb in self.callbacks if isinstance(cb, EMACallback)), None)
        if ema is None:
            yield
            return
        with ema.swapped(self.params):
            yield
