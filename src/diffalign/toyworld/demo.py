"""`diffalign demo`: the whole alignment workflow on the toy world, offline, in minutes on a CPU.

1. data: sample the shipped base pipeline on the `train` prompts, score with the `toy` reward, keep best-vs-worst
   pairs (near-ties dropped) as a Pick-a-Pic-schema parquet → `DIR/data/`;
2. train: the normal trainer with the method's toy preset (`configs/toy_<method>.yaml`) → `DIR/<method>/`;
3. evaluate: base vs aligned on the `heldout` prompts (never trained on) with paired seeds that training never
   used, through `diffalign eval` → `DIR/report/`.

Methods plug in with `register_demo(DemoMethod(...))`: how to build their training data and which models to
compare.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffalign.config import build_config, read_yaml

from .reward import toy_components, toy_reward
from .sampling import SAMPLING, generate, load_pipeline, pipeline_path
from .world import RESOLUTION, prompts

logger = logging.getLogger(__name__)

EVAL_SEEDS = tuple(range(1000, 1008))
"""Held-out evaluation seeds: training data uses seeds below 1000, so no evaluation noise was ever trained on."""


@dataclass
class DemoContext:
    out: Path
    quick: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def train_prompts(self) -> list[str]:
        found = prompts("train")
        return found[::12] if self.quick else found

    def eval_prompts(self) -> int | None:
        return 4 if self.quick else None


@dataclass
class DemoMethod:
    """How `diffalign demo --method <name>` builds its data and what it compares.

    Attributes:
        name (`str`): the trainer's method name (`diffalign train <name>`).
        build_data (`Callable[[DemoContext], str]`): writes training data under `ctx.data_dir`, returns its path.
        eval_models (`Callable[[DemoContext, Path], dict]`): `final/` folder → the `models` mapping of the eval.
        train (`Callable[[DemoContext, str], Path]`, *optional*): data → `final/`, for a method that is not one
            training run (SAIL); default: `train_method` with the method's toy preset.
    """

    name: str
    build_data: Callable[[DemoContext], str]
    eval_models: Callable[[DemoContext, Path], dict]
    train: Callable[[DemoContext, str], Path] | None = None  # default: `train_method` with the toy preset


DEMO_METHODS: dict[str, DemoMethod] = {}


def register_demo(method: DemoMethod) -> DemoMethod:
    DEMO_METHODS[method.name] = method
    return method


def _png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def toy_preference_pairs(
    ctx: DemoContext,
    images_per_prompt: int = 4,
    pairs_per_prompt: int = 1,
    min_gap: float = 0.15,
    by_correctness: bool = False,
) -> str:
    """Sample `images_per_prompt` base images per train prompt (seeds 0..k−1) and score them with `toy_reward`;
    pair the i-th best with the i-th worst (i < `pairs_per_prompt`) when their rewards differ by at least `min_gap`
    (near-ties dropped). With `by_correctness`, winners must have the shape colour AND the background right and
    losers one of them wrong (`toy_components`), as TOYWORLD_NOTES advise ("one image right, the other wrong").
    Writes `pairs.parquet` (Pick-a-Pic schema + `score_0`/`score_1`); an existing file with the same settings is
    reused. The winner's column alternates so `label_0`/`label_1` carry real information."""
    import pandas as pd

    path = ctx.data_dir / "pairs.parquet"
    settings = {"images_per_prompt": images_per_prompt, "pairs_per_prompt": pairs_per_prompt, "min_gap": min_gap}
    settings["by_correctness"] = by_correctness
    settings.update(quick=ctx.quick, **SAMPLING)
    meta = ctx.data_dir / "pairs.json"
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
        logger.info("reusing %s", path)
        return str(path)
    captions = ctx.train_prompts()
    all_prompts = [c for c in captions for _ in range(images_per_prompt)]
    seeds = [s for _ in captions for s in range(images_per_prompt)]
    images = generate(load_pipeline(), all_prompts, seeds)
    rewards = toy_reward(images, all_prompts).view(len(captions), images_per_prompt)
    images = images.view(len(captions), images_per_prompt, *images.shape[1:])
    right = torch.ones_like(rewards, dtype=torch.bool)
    if by_correctness:
        parts = toy_components(images.flatten(0, 1), all_prompts)
        right = (parts["colour_correct"] * parts["background_correct"]).view_as(rewards).bool()
    rows, dropped = [], 0
    for i, caption in enumerate(captions):
        order = rewards[i].argsort(descending=True).tolist()
        winners = [j for j in order if right[i, j]] if by_correctness else order
        losers = [j for j in reversed(order) if not right[i, j]] if by_correctness else order[::-1]
        for k in range(min(pairs_per_prompt, images_per_prompt // 2)):
            if k >= min(len(winners), len(losers)):
                dropped += 1
                continue
            best, worst = winners[k], losers[k]
            if float(rewards[i, best] - rewards[i, worst]) < min_gap:
                dropped += 1
                continue
            w = (_png(images[i, best]), float(rewards[i, best]))
            lo = (_png(images[i, worst]), float(rewards[i, worst]))
            first, second = (w, lo) if len(rows) % 2 == 0 else (lo, w)
            rows.append(
                {
                    "caption": caption,
                    "jpg_0": first[0],
                    "jpg_1": second[0],
                    "label_0": 1.0 if first is w else 0.0,
                    "label_1": 0.0 if first is w else 1.0,
                    "score_0": first[1],
                    "score_1": second[1],
                }
            )
    ctx.data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    stats = {"prompts": len(captions), "pairs": len(rows), "near_ties_dropped": dropped}
    meta.write_text(json.dumps({"settings": settings, "stats": stats}, indent=2))
    logger.info("toy preference pairs: %s → %s", stats, path)
    return str(path)


def lora_vs_base(ctx: DemoContext, final: Path, name: str) -> dict:
    return {"base": {"model": "toy"}, name: {"model": "toy", "lora": str(final)}}


def negative_vs_cfg(ctx: DemoContext, final: Path, name: str, beta: float = 1.0) -> dict:
    """Plain CFG on the base vs the same base with the trained δ in the CFG unconditional branch (NPO, Self-NPO),
    θ_neg = θ_base + β·δ: same prompts, seeds and sampler."""
    return {"base": {"model": "toy"}, name: {"model": "toy", "negative_adapter": str(final), "beta": beta}}


def toy_caption_list(ctx: DemoContext) -> str:
    """Self-NPO's input: the `train` captions as a caption list (`self_npo_captions.txt`, one per line) — no images,
    no preference labels, no reward. The trainer starts each chain from pure noise and samples its own way down.
    Rewritten whenever it differs (a `--quick` run's shorter list in the same folder must not be reused)."""
    out = ctx.data_dir / "self_npo_captions.txt"
    text = "\n".join(ctx.train_prompts()) + "\n"
    if not out.is_file() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return str(out)


def train_method(ctx: DemoContext, method: str, data: str) -> Path:
    """Train `method` on `data` with the toy preset; resumes an interrupted run, reuses a finished one."""
    from diffalign.trainers import get_trainer

    cls = get_trainer(method)
    out = ctx.out / method
    preset = read_yaml(f"toy_{method.replace('-', '_')}")  # `self-npo` → toy_self_npo.yaml
    layer = {"model": str(pipeline_path()), "data": data, "output_dir": str(out), "resume": "latest"}
    if ctx.quick:
        layer.update(max_steps=2, checkpointing_steps=0, batch_size=4)
    config = build_config(cls.config_class, preset, layer, ctx.overrides, source=f"toy_{method} preset")
    final = out / "final"
    done = final.is_dir() and (final / "config.yaml").is_file()
    if done and read_yaml(final / "config.yaml") == json.loads(json.dumps(config.model_dump(mode="json"))):
        logger.info("reusing finished run %s", final)
        return final
    return cls(config).train()


def toy_eval_config(models: dict, prompts: str, seeds: list[int], out: str | Path, **overrides: Any):
    """The toy world's paired-seed evaluation config: every model on the same `prompts` × `seeds` with the toy
    pipeline's own sampler (DDIM, `SAMPLING`), scored by the `toy` reward; `overrides` replace any key (e.g.
    `guidance_scale`, `max_prompts`, `grid_prompts`)."""
    from diffalign.evaluation.run import EvalConfig

    settings = {
        "models": models,
        "baseline": "base",
        "prompts": prompts,
        "rewards": ["toy"],
        "seeds": list(seeds),
        "scheduler": "ddim",
        "resolution": RESOLUTION,
        "batch_size": 64,
        "reward_batch_size": 256,
        "device": "cpu",
        "out": str(out),
        **SAMPLING,
    }
    return build_config(EvalConfig, {**settings, **overrides}, source="toy evaluation")


def evaluate(ctx: DemoContext, models: dict) -> dict:
    from diffalign.evaluation.report import plot_metrics
    from diffalign.evaluation.run import run_eval

    seeds = EVAL_SEEDS[:2] if ctx.quick else EVAL_SEEDS
    cfg = toy_eval_config(models, "toy:heldout", seeds, ctx.out / "report", max_prompts=ctx.eval_prompts())
    results = run_eval(cfg)
    for name in models:
        metrics = ctx.out / name / "metrics.jsonl"
        if metrics.is_file():
            plot_metrics(metrics, ctx.out / "report" / f"{name}_metrics.png")
    return results


def run_demo(method: str = "dpo", out: str | Path = "demo_out", quick: bool = False, **overrides: Any) -> dict:
    """The three steps above; returns the evaluation results (as in `results.json`) plus `timings` in seconds."""
    if method not in DEMO_METHODS:
        raise ValueError(f"unknown demo method {method!r}; available: {', '.join(sorted(DEMO_METHODS))}")
    spec = DEMO_METHODS[method]
    ctx = DemoContext(Path(out), quick=quick, overrides=overrides)
    timings = {}
    start = time.perf_counter()
    data = spec.build_data(ctx)
    timings["data"] = time.perf_counter() - start
    start = time.perf_counter()
    final = spec.train(ctx, data) if spec.train is not None else train_method(ctx, method, data)
    timings["train"] = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluate(ctx, spec.eval_models(ctx, final))
    timings["evaluate"] = time.perf_counter() - start
    results["timings"] = timings
    (ctx.out / "report" / "demo.json").write_text(json.dumps({"method": method, "timings": timings}, indent=2))
    return results


def format_summary(results: dict, out: str | Path) -> str:
    """The table `diffalign demo` prints."""
    models = results["models"]
    lines = ["", "| model | mean toy reward | n |", "|---|---|---|"]
    for name, by_reward in models.items():
        r = by_reward["toy"]
        lines.append(f"| {name} | {r['mean']:.3f} ± {r['std']:.3f} | {r['n']} |")
    lines += ["", "| comparison | win rate | 95 % interval (prompt bootstrap) | n |", "|---|---|---|---|"]
    for pair, by_reward in results["win_rates"].items():
        r = by_reward["toy"]
        lines.append(f"| {pair} | {r['win_rate']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['n']} |")
    t = results.get("timings", {})
    if t:
        lines.append("")
        lines.append(", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + f" (total {sum(t.values()):.0f} s)")
    lines += rounds_summary(out) if "sail" in models else []
    report = Path(out) / "report"
    lines.append(f"report: {report / 'report.md'} · grid: {report / 'grid.png'} · results: {report / 'results.json'}")
    return "\n".join(lines)


# ---- registered methods -------------------------------------------------------------------------------------------
def curated_pairs(ctx: DemoContext) -> str:
    """DPO/KTO/NPO demo data: 16 samples per train prompt, up to 4 pairs of a right image (shape colour and
    background) against a wrong one."""
    if ctx.quick:
        return toy_preference_pairs(ctx, images_per_prompt=4, pairs_per_prompt=1, by_correctness=True)
    return toy_preference_pairs(ctx, images_per_prompt=16, pairs_per_prompt=4, by_correctness=True)


register_demo(DemoMethod("dpo", curated_pairs, lambda ctx, final: lora_vs_base(ctx, final, "dpo")))
register_demo(DemoMethod("kto", curated_pairs, lambda ctx, final: lora_vs_base(ctx, final, "kto")))
# TPO: the world's own renders of the train captions + rule-perturbed captions (no image pairs, no reward)
from .perturb import toy_tpo_data  # noqa: E402

register_demo(DemoMethod("tdpo", toy_tpo_data, lambda ctx, final: lora_vs_base(ctx, final, "tdpo")))
register_demo(DemoMethod("tkto", toy_tpo_data, lambda ctx, final: lora_vs_base(ctx, final, "tkto")))
# SmPO: the same self-labelled pairs, re-scored by `diffalign label` with the toy reward (score_0/score_1)


def toy_scored_pairs(ctx) -> str:
    """Toy-world demo data for SmPO: exactly the DPO demo's pairs (its registered `build_data`), re-scored from their
    stored PNGs by `label_pairs` with the `toy` reward (what `diffalign label --reward toy` does)."""
    from diffalign.labeling import label_pairs

    pairs = DEMO_METHODS["dpo"].build_data(ctx)
    return label_pairs(pairs, reward="toy", batch_size=256, show_progress=False)["out"]


register_demo(DemoMethod("smpo", toy_scored_pairs, lambda ctx, final: lora_vs_base(ctx, final, "smpo")))
# NPO / Self-NPO: δ goes into the CFG unconditional branch; evaluated as plain CFG vs CFG with the negative adapter.
# NPO trains on the DPO demo's pairs (reversed by the trainer): on best-vs-worst pairs by reward alone (4 samples per
# prompt) the negative adapter hurt (held-out win rate 0.31 at CFG 4); on the right-vs-wrong pairs it helps (0.648
# at CFG 3).
register_demo(DemoMethod("npo", curated_pairs, lambda ctx, final: negative_vs_cfg(ctx, final, "npo")))
# Self-NPO: its δ at β 0.5, the best of 0.25 / 0.5 / 1 on the validation split (pure-noise start; toy_self_npo.yaml).
SELF_NPO_BETA = 0.5
register_demo(
    DemoMethod("self-npo", toy_caption_list, lambda ctx, final: negative_vs_cfg(ctx, final, "self-npo", SELF_NPO_BETA))
)
# SAIL (`diffalign demo --method sail`): SAIL from ~6 % of the toy DPO pairs, against DPO on that seed and on all.
# 1. data: the DPO demo's right-vs-wrong pairs (`curated_pairs`) and a seeded 6 % of them → `seed_pairs.parquet`;
# 2. train: `run_sail` → `DIR/sail/` (round 0 = DPO on the seed from the base, then `SAIL_ROUNDS` self-labelled
#    rounds on disjoint halves of the `train` captions; every round's LoRA over the base at
#    `DIR/sail/round-<k>/final`, the last also at `DIR/sail/final`), and the DPO demo's run on all pairs → `DIR/dpo/`
#    (reused when present);
# 3. evaluate: base, DPO on the seed (= SAIL's round 0), SAIL's rounds and DPO on all pairs, held-out captions.
SEED_FRACTION = 0.06
"""Share of the toy DPO pairs given to SAIL as its human seed (the paper: ~6 % of Pick-a-Pic v2)."""
SAIL_ROUNDS = 2
"""Self-labelled rounds after round 0 (the paper: 3 on SD1.5, 2 on SDXL)."""


def seed_pairs(ctx: DemoContext) -> str:
    """A seeded `SEED_FRACTION` of the DPO demo's pairs → `seed_pairs.parquet` (at least 2 rows)."""
    import pandas as pd

    pairs = pd.read_parquet(curated_pairs(ctx))
    n = max(2, round(SEED_FRACTION * len(pairs)))
    out = ctx.data_dir / "seed_pairs.parquet"
    pairs.sample(n=n, random_state=0).reset_index(drop=True).to_parquet(out)
    return str(out)


def sail_config(ctx: DemoContext, seed: str):
    """The demo's `SAILConfig`: every round trains with the `toy_dpo` preset; labels by the implicit reward, checked
    against the toy reward."""
    from diffalign.iterate import SAILConfig

    train = read_yaml("toy_dpo")
    settings = {"model": str(pipeline_path()), "data": seed, "prompts": "toy:train", "rounds": SAIL_ROUNDS,
                "output_dir": str(ctx.out / "sail"), "candidates": 8, "noise_draws": 10, "heldout_reward": "toy",
                "train": train, "sample_batch_size": 64, "label_batch_size": 80, "device": "cpu"}  # fmt: skip
    if ctx.quick:
        train.update(max_steps=2, checkpointing_steps=0, batch_size=4)
        settings.update(prompts_per_round=3, candidates=3, noise_draws=2)
    return build_config(SAILConfig, settings, ctx.overrides, source="toy SAIL demo")


def train_sail(ctx: DemoContext, seed: str) -> Path:
    """SAIL (resumable) and, for comparison, DPO on all the demo's pairs (the `dpo` demo's run)."""
    from diffalign.iterate import run_sail

    final = run_sail(sail_config(ctx, seed))
    train_method(ctx, "dpo", curated_pairs(ctx))
    return final


def sail_models(ctx: DemoContext, final: Path) -> dict:
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


register_demo(DemoMethod("sail", seed_pairs, sail_models, train=train_sail))
