"""`SAILConfig`: the whole multi-round loop from one config (`diffalign train sail`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from diffalign.config import StrictConfig

SET_BY_THE_LOOP = ("model", "data", "output_dir", "resume", "init_from")


class SAILConfig(StrictConfig):
    """SAIL (He et al., ICLR 2026): round 0 = DPO on the seed pairs from the base; each later round samples
    `candidates` images per prompt on a prompt set of its own, labels them with the DPO implicit reward of the
    current model against the anchor (or with `labeler`), pairs best vs worst, mixes `mixup_self` self-labelled with
    seed pairs, and trains DPO from the round's starting model (reference reset to it). Paper defaults: 8
    candidates, 10 (t, ε) draws, 25 % self pairs, β 5000, 3 rounds (SD1.5) / 2 (SDXL), global batch 128."""

    # --- what ---------------------------------------------------------------------------------------------------
    model: str = Field(description="Base pipeline folder (`toy`, or a hub id when online).")
    data: str = Field(description="Seed preference pairs: any Pick-a-Pic-schema table the data layer reads.")
    prompts: str = Field(
        description="Prompts of the self-labelled rounds (file, `toy:train`, `pickapic:PATH`, …); shuffled once and "
        "cut into disjoint per-round sets."
    )
    output_dir: str = Field("runs/sail", description="OUT: round-<k>/ folders, sail_rounds.jsonl, final/.")
    rounds: int = Field(3, ge=0, description="Self-labelled rounds after round 0 (paper: 3 SD1.5, 2 SDXL).")
    prompts_per_round: int | None = Field(
        None, ge=1, description="Prompts per self-labelled round; none = the prompt set split evenly over `rounds`."
    )
    candidates: int = Field(8, ge=2, description="Images sampled per prompt, seeds recorded (paper: 8).")
    noise_draws: int = Field(10, ge=1, description="(t, ε) draws averaged by the implicit reward (paper: 10).")
    mixup_self: float = Field(
        0.25, gt=0, le=1, description="Fraction of self-labelled pairs in a round's data; the rest are seed pairs."
    )
    labeler: str | dict[str, Any] = Field(
        "implicit", description="`implicit` (SAIL), or a reward name / {name: …} of `diffalign.rewards` (online DPO)."
    )
    min_margin: float = Field(0.0, ge=0, description="Drop a prompt whose best − worst label is <= this (ties).")
    # --- per-round training -------------------------------------------------------------------------------------
    method: Literal["dpo", "kto"] = Field("dpo", description="Objective of each round (KTO reads the pairs unpaired).")
    train: dict[str, Any] = Field(
        default_factory=dict, description="Keys of the round trainer's config (beta, lora_rank, max_steps, …)."
    )
    round_train: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description="Per-round overrides of `train`: {0: {max_steps: 100}, …}."
    )
    # --- sampling -----------------------------------------------------------------------------------------------
    num_inference_steps: int | None = Field(None, ge=1, description="Sampler steps; none = the model's own.")
    guidance_scale: float | None = Field(None, description="CFG scale; none = the model's own (toy 3, else 7.5).")
    scheduler: str | None = Field(None, description="ddim, ddpm, euler, …; none keeps the pipeline's.")
    sample_resolution: int | None = Field(None, description="Image side in pixels; none = the model's default.")
    sample_batch_size: int = Field(8, ge=1, description="Images per pipeline call.")
    label_batch_size: int = Field(32, ge=1, description="Denoiser rows per judge forward pass.")
    device: str | None = Field(None, description="cuda / cpu for sampling and labelling; none → cuda if available.")
    seed: int = Field(0, description="Seeds the prompt split, the mixup draw and the judge's (t, ε) draws.")
    # --- health -------------------------------------------------------------------------------------------------
    heldout_reward: str | dict[str, Any] | None = Field(
        None, description="Reward that checks the labels (agreement); the toy world: `toy`. Not used for labels."
    )
    collapse_diversity: float = Field(
        0.5, ge=0, le=1, description="Warn when a round's seed diversity falls below this × round 1's."
    )
    collapse_confidence: float | None = Field(
        None, gt=0, lt=1, description="Warn when the mean σ(label margin) exceeds this (off: its scale follows β)."
    )
    stop_on_collapse: bool = Field(False, description="Stop before training a round that raised a collapse warning.")

    @field_validator("train")
    @classmethod
    def _loop_owns_paths(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = [k for k in SET_BY_THE_LOOP if k in v]
        if taken:
            raise ValueError(f"`train` must not set {taken}: the loop sets {list(SET_BY_THE_LOOP)} for every round")
        return v
