"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) by test_fsdp.py: full fine-tunes under
FSDP2 — one step at 2 processes × 2, and a stop-at-2 / resume-to-4 pair (with clipping and EMA) against a
straight 4-step run.

accelerate only routes FSDP to accelerator devices, although FSDP2 itself runs on CPU with gloo; so this runner
switches the accelerator's state to FSDP2 (the plugin `configs/accelerate/fsdp.yaml` describes) right after it
starts. Everything after that — preparing the policy, sharding the reference, sharded checkpoints, gathering
final/ — is the library's own code path.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/fsdp_runner.py ROOT MODEL
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import scale_cases  # noqa: E402

torch.set_num_threads(1)


def force_fsdp2() -> None:
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import diffalign.trainers.base as base

    class FSDP2OnCPU(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["BasicTransformerBlock", "ResnetBlock2D"],
                state_dict_type="SHARDED_STATE_DICT",
                reshard_after_forward=True,
            )
            for state in (self.state, PartialState()):
                state.__dict__["distributed_type"] = DistributedType.FSDP
            self.state.__dict__["fsdp_plugin"] = plugin

    base.Accelerator = FSDP2OnCPU


def describe_reference(trainer, path: Path) -> None:
    """What each rank holds of the frozen reference: sharded (DTensor) parameters and their local sizes."""
    params = list(trainer.ref_copy.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    facts = {
        "all_sharded": all(type(p).__name__ == "DTensor" for p in params),
        "local_numel": local,
        "full_numel": sum(p.numel() for p in params),
        "distributed_type": trainer.distributed_type,
    }
    path.write_text(json.dumps(facts))


def main(root: Path, model: str) -> None:
    import os

    force_fsdp2()
    data = scale_cases.write_data(root / "data")["dpo"]
    cls = scale_cases.trainer_class("dpo")
    trainer = cls(scale_cases.config("dpo", model, data, root / "fsdp-2x2", 2, 1, lora_rank=0))
    trainer.setup()
    describe_reference(trainer, root / f"reference-rank{os.environ['RANK']}.json")
    trainer.train()
    common = dict(lora_rank=0, learning_rate=1e-3, adam_epsilon=1e-8, random_flip=True, max_grad_norm=1.0,
                  ema_decay=0.5)  # fmt: skip
    scale_cases.run("dpo", model, data, root / "straight", 2, 1, max_steps=4, **common)
    scale_cases.run("dpo", model, data, root / "split", 2, 1, max_steps=2, checkpointing_steps=2, **common)
    scale_cases.run("dpo", model, data, root / "split", 2, 1, max_steps=4, checkpointing_steps=2, resume="latest",
                    **common)  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
