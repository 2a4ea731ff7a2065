"""What a full fine-tune needs under a sharding engine (FSDP2, DeepSpeed ZeRO) beyond `accelerator.prepare`:
the frozen reference sharded like the policy (not a full fp32 replica per GPU), checks that every rank agrees on,
and the engine's limits stated before training instead of a hang.

FSDP2 runs on CPU processes too, so the tests train under it with gloo; DeepSpeed needs GPUs (see the README's
"Training on many GPUs" for what is verified where).
"""

from __future__ import annotations

import torch

from diffalign.trainers.distributed import LaunchError


def check_sharded_run(accelerator, distributed_type: str, config) -> None:
    """Refuse what diffalign does not do under FSDP/ZeRO with one line: FSDP1 (the reference and the checkpoint
    layout follow FSDP2's `fully_shard`), and validation during training (it runs on the main process alone, while
    sharded weights need every rank)."""
    if distributed_type == "FSDP" and _older_accelerate(FSDP_ACCELERATE):
        import accelerate

        raise LaunchError(
            f"FSDP runs need accelerate >= {FSDP_ACCELERATE} (with {accelerate.__version__} a sharded checkpoint did "
            "not resume exactly in diffalign's floors job): `pip install -U accelerate`"
        )
    if distributed_type == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise LaunchError(
            "FSDP runs need `fsdp_version: 2` in the accelerate config (diffalign shards the reference with FSDP2's "
            "fully_shard); see configs/accelerate/fsdp.yaml"
        )
    if config.validation_steps and (config.validation_data or config.validation_prompts):
        raise LaunchError(
            f"validation during training is not available under {distributed_type} (sharded weights); set "
            "`validation_steps: 0` and evaluate the checkpoints with `diffalign evaluate`"
        )


FSDP_ACCELERATE = "1.16"  # the oldest accelerate whose FSDP2 checkpoints resumed exactly in tests/test_fsdp.py


def _older_accelerate(version: str) -> bool:
    import accelerate
    from packaging.version import Version

    return Version(accelerate.__version__) < Version(version)


def shard_reference(accelerator, distributed_type: str, reference: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference copy of a full fine-tune, sharded the way the policy is: FSDP2 `fully_shard` with the
    run's wrap policy (each rank holds 1/N of it, gathered layer by layer in forward); under ZeRO-3 a DeepSpeed
    inference engine with stage 3, under ZeRO-1/2 (which do not shard weights) the frozen half-precision copy as
    it is (TRL's `prepare_deepspeed` makes the same choice). The reference is not registered with the accelerator:
    checkpoints do not carry it (it is the base model)."""
    if distributed_type == "FSDP":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, reference).eval()
    if distributed_type == "DEEPSPEED":
        return _deepspeed_reference(accelerator, reference)
    return reference


def deepspeed_reference_config(train_config: dict) -> dict:
    """The DeepSpeed config of the frozen reference: ZeRO-3 → stage 3 (parameters sharded, no optimizer);
    otherwise stage 0. Precision and micro-batch follow the training config."""
    zero = dict(train_config.get("zero_optimization", {}))
    stage = zero.get("stage", 0)
    config = {
        "train_micro_batch_size_per_gpu": train_config.get("train_micro_batch_size_per_gpu", 1),
        "zero_optimization": {"stage": 3 if stage == 3 else 0},
    }
    for precision in ("bf16", "fp16"):
        if train_config.get(precision, {}).get("enabled"):
            config[precision] = {"enabled": True}
    if stage == 3:
        for key in ("stage3_param_persistence_threshold", "offload_param"):
            if key in zero:
                config["zero_optimization"][key] = zero[key]
    return config


def _deepspeed_reference(accelerator, reference: torch.nn.Module) -> torch.nn.Module:
    import deepspeed

    plugin = accelerator.state.deepspeed_plugin
    config = deepspeed_reference_config(plugin.deepspeed_config)
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    return engine.module.eval()


def all_finite(accelerator, tensors: list[torch.Tensor], sharded: bool) -> bool:
    """True when Σ t² over `tensors` is finite. Sharded tensors (DTensor) are checked on this rank's shard and the
    verdict is agreed over all ranks, so every rank takes the same branch (a rank that stopped alone would leave
    the others waiting in the next collective)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    squares = [t.detach().float().pow(2).sum() for t in local]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if sharded:
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum")
    return bool(torch.isfinite(total))


def first_non_finite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first tensor with a non-finite value in this rank's part of it, or None."""
    for name, t in named:
        local = t.to_local() if hasattr(t, "to_local") else t
        if not torch.isfinite(local).all():
            return name
    return None
