"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) by test_distributed.py: every method's
one-step case at 2 processes × batch 2, a checkpoint-every-step stress run, and a stop-and-resume pair.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/distributed_runner.py ROOT MODEL
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import scale_cases  # noqa: E402

torch.set_num_threads(1)


def count_vae_calls(root: Path) -> None:
    """Each rank records how many images its VAE encoded while the latent cache was built."""
    import os

    from diffalign.backbones.base import PipelineBackbone

    original = PipelineBackbone.encode_images
    calls = {"images": 0}

    def counting(self, pixels):
        calls["images"] += len(pixels)
        return original(self, pixels)

    PipelineBackbone.encode_images = counting
    rank = os.environ.get("RANK", "0")
    return lambda: (root / f"vae-images-rank{rank}.txt").write_text(str(calls["images"]))


def main(root: Path, model: str) -> None:
    data = scale_cases.write_data(root / "data")
    # the latent cache is built once: the main process encodes, the other one reads (cache_latents)
    write_count = count_vae_calls(root)
    scale_cases.run("dpo", model, data["dpo"], root / "cached", 2, 1, cache_latents=True, max_steps=1)
    write_count()
    for method in scale_cases.METHODS:
        scale_cases.run(method, model, data[method], root / f"{method}-2x2", batch_size=2, ga=1)
    dpo = data["dpo"]
    # checkpoint every step (the rename used to race the other rank's RNG-state write)
    scale_cases.run("dpo", model, dpo, root / "stress", 2, 1, max_steps=6, checkpointing_steps=1,
                    checkpoints_total_limit=2, learning_rate=1e-3)  # fmt: skip
    # stop at step 2, resume to 4, against a straight 4-step run
    common = dict(learning_rate=1e-3, adam_epsilon=1e-8, random_flip=True)
    scale_cases.run("dpo", model, dpo, root / "straight", 2, 1, max_steps=4, **common)
    scale_cases.run("dpo", model, dpo, root / "split", 2, 1, max_steps=2, checkpointing_steps=2, **common)
    scale_cases.run("dpo", model, dpo, root / "split", 2, 1, max_steps=4, checkpointing_steps=2, resume="latest",
                    **common)  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
