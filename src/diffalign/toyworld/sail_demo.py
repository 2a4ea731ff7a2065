"""`diffalign demo --method sail`: SAIL from ~6 % of the toy DPO pairs, against DPO on that seed and DPO on all.

1. data: the DPO demo's right-vs-wrong pairs (`curated_pairs`), a seeded 6 % of them → `DIR/data/seed_pairs.parquet`;
2. train: `run_sail` → `DIR/sail/` (round 0 = DPO on the seed from the base, then `SAIL_ROUNDS` self-labelled rounds on
   disjoint halves of the `train` captions; every round's LoRA over the base at `DIR/sail/round-<k>/final`, the last
   also at `DIR/sail/final`), and the DPO demo's run on all pairs → `DIR/dpo/` (reused when present);
3. evaluate: base, DPO on the seed (= SAIL's round 0), SAIL's rounds and DPO on all pairs on the held-out captions.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.config import build_config, read_yaml

SEED_FRACTION = 0.06
"""Share of the toy DPO pairs given to SAIL as its human seed (the paper: ~6 % of Pick-a-Pic v2)."""
SAIL_ROUNDS = 2
"""Self-labelled rounds after round 0 (the paper: 3 on SD1.5, 2 on SDXL)."""


def seed_pairs(ctx) -> str:
    """A seeded `SEED_FRACTION` of the DPO demo's pairs → `seed_pairs.parquet` (at least 2 rows)."""
    import pandas as pd

    from .demo import curated_pairs

    pairs = pd.read_parquet(curated_pairs(ctx))
    n = max(2, round(SEED_FRACTION * len(pairs)))
    out = ctx.data_dir / "seed_pairs.parquet"
    pairs.sample(n=n, random_state=0).reset_index(drop=True).to_parquet(out)
    return str(out)


def sail_config(ctx, seed: str):
    """The demo's `SAILConfig`: every round trains with the `toy_dpo` preset; labels by the implicit reward, checked
    against the toy reward."""
    from diffalign.iterate import SAILConfig

    from .sampling import pipeline_path

    train = read_yaml("toy_dpo")
    settings = {"model": str(pipeline_path()), "data": seed, "prompts": "toy:train", "rounds": SAIL_ROUNDS,
                "output_dir": str(ctx.out / "sail"), "candidates": 8, "noise_draws": 10, "heldout_reward": "toy",
                "train": train, "sample_batch_size": 64, "label_batch_size": 80, "device": "cpu"}  # fmt: skip
    if ctx.quick:
        train.update(max_steps=2, checkpointing_steps=0, batch_size=4)
        settings.update(prompts_per_round=3, candidates=3, noise_draws=2)
    return build_config(SAILConfig, settings, ctx.overrides, source="toy SAIL demo")


def train_sail(ctx, seed: str) -> Path:
    """SAIL (resumable) and, for comparison, DPO on all the demo's pairs (the `dpo` demo's run)."""
    from diffalign.iterate import run_sail

    from .demo import curated_pairs, train_method

    final = run_sail(sail_config(ctx, seed))
    train_method(ctx, "dpo", curated_pairs(ctx))
    return final


def sail_models(ctx, final: Path) -> dict:
    sail = ctx.out / "sail"
    models = {"base": {"model": "toy"}, "dpo-seed": {"model": "toy", "lora": str(sail / "round-0" / "final")}}
    rounds = sorted(int(p.name.split("-")[1]) for p in sail.glob("round-*") if (p / "done.json").is_file())
    for k in rounds[1:-1]:
        models[f"sail-round-{k}"] = {"model": "toy", "lora": str(sail / f"round-{k}" / "final")}
    models["sail"] = {"model": "toy", "lora": str(final)}
    models["dpo-all"] = {"model": "toy", "lora": str(ctx.out / "dpo" / "final")}
    return models


def rounds_summary(out: str | Path) -> list[str]:
    """Per-round lines of `sail_rounds.jsonl`: self-label agreement with the toy reward, margins, diversity."""
    path = Path(out) / "sail" / "sail_rounds.jsonl"
    if not path.is_file():
        return []
    lines = ["", "| round | self pairs | agreement with toy reward | concordance | mean toy reward of candidates | "
             "diversity | margin median | collapse warning |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in map(json.loads, path.read_text().splitlines()):
        if row["round"] == 0:
            continue
        f = {k: (f"{row[k]:.3f}" if isinstance(row.get(k), float) else "—") for k in
             ("agreement", "concordance", "heldout_mean", "diversity", "margin_median")}  # fmt: skip
        lines.append(f"| {row['round']} | {row['self_pairs']} | {f['agreement']} | {f['concordance']} | "
                     f"{f['heldout_mean']} | {f['diversity']} | {f['margin_median']} | "
                     f"{'; '.join(row.get('collapse_warning') or []) or 'none'} |")  # fmt: skip
    return lines
