"""Iterative alignment: generate → label → pair → mix → train, over the shared DPO trainer.

SAIL (Self-Amplified Iterative Learning, He et al., ICLR 2026) is this loop with the DPO implicit-reward labeler;
with a reward of the registry as the labeler it is online / iterative DPO. Entry points: `SAILConfig`, `run_sail`
(`diffalign train sail`). Reuses `evaluation` (sampling with recorded seeds), `rewards`, the data layer's
Pick-a-Pic schema and `trainers` (one training run per round); it adds no training loop.
"""

from .config import SAILConfig
from .loop import run_sail

__all__ = ["SAILConfig", "run_sail"]
