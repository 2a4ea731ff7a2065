"""SAIL (Self-Amplified Iterative Learning, He et al., ICLR 2026): Diffusion-DPO from a small seed, then rounds that
label the model's own samples with its DPO implicit reward. The loop lives in `diffalign.iterate`; this is its
entry in the trainer table (`diffalign train sail`, `diffalign.train("sail", …)`)."""

from __future__ import annotations

from pathlib import Path

from diffalign.iterate import SAILConfig, run_sail


class SAILTrainer:
    """Runs every round with the DPO (or KTO) trainer; not a `Trainer` subclass, since it owns no loop of its own."""

    method = "sail"
    config_class = SAILConfig

    def __init__(self, config: SAILConfig, callbacks=None):
        self.config = config
        self.accelerator = None  # each round's trainer has its own
        self.metrics_file = Path(config.output_dir) / "sail_rounds.jsonl"

    def train(self) -> Path:
        return run_sail(self.config)
