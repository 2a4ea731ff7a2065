"""`diffalign eval` and `diffalign score`: generate with paired seeds, score, compare, report.

    cfg = load_config(EvalConfig, "configs/eval_toy.yaml", ["--seeds", "[0, 1]"])
    results = run_eval(cfg)

`out/` receives `results.json`, `scores.jsonl` (one line per image), `images/<model>/seed<k>/...png`,
`grid.png` (prompt rows × model columns) and `report.md`.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from diffalign import __version__
from diffalign.config import ConfigError, StrictConfig
from diffalign.rewards import create, parse_spec
from diffalign.rewards.base import resolve_device, resolve_dtype

from .generate import SCHEDULERS, check_settings, generate_images, image_path, load_pipeline
from .prompts import PromptItem, PromptSet, load_prompts
from .report import image_grid, markdown_report
from .stats import summarize, win_rate

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ModelSpec(StrictConfig):
    """One model under evaluation."""

    model: str = Field(description="diffusers pipeline folder, hub id, or `toy` (the shipped toy pipeline)")
    lora: str | None = Field(None, description="LoRA weights (diffusers format): .safetensors file or its folder")
    negative_adapter: str | None = Field(
        None, description="δ for the CFG unconditional branch (NPO / Self-NPO final/ folder or weights file)"
    )
    alpha: float = Field(1.0, description="weight of the positive offset η in θ_neg = θ_base + α·η + β·δ")
    beta: float = Field(1.0, description="weight of the negative offset δ in θ_neg = θ_base + α·η + β·δ")
    base: str | None = Field(None, description="base model (for η = θ − θ_base), only for α ≠ 1 with a full fine-tune")


class EvalConfig(StrictConfig):
    """What to generate, how, and how to score it. Every model uses the same prompts, seeds and sampler."""

    # what
    models: dict[str, ModelSpec] = Field(description="NAME → {model, lora, negative_adapter, alpha, beta}")
    baseline: str | None = Field(None, description="NAME every other model is compared with; none → all pairs")
    prompts: str = Field("toy:heldout", description="prompt file/folder, `toy:heldout`, `toy:train`, `pickapic:PATH`")
    max_prompts: int | None = Field(None, ge=1, description="keep the first N prompts (per style for HPSv2)")
    rewards: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["toy"], description="reward names, or {name, label, **reward kwargs}"
    )
    # sampling
    seeds: list[int] = Field(default_factory=lambda: [0], description="one image per prompt per seed")
    num_inference_steps: int = Field(20, ge=1, description="sampler steps")
    guidance_scale: float = Field(7.5, description="classifier-free guidance scale (1 = off)")
    scheduler: str | None = Field(None, description=f"sampler: {', '.join(SCHEDULERS)}; none keeps the pipeline's")
    resolution: int | None = Field(None, description="image side in pixels (divisible by 8); none → model default")
    # running
    out: str = Field("runs/eval", description="output folder (images are reused from here on resume)")
    batch_size: int = Field(8, ge=1, description="prompts per pipeline call")
    reward_batch_size: int = Field(16, ge=1, description="images per reward forward pass")
    device: str | None = Field(None, description="cuda / cpu / ...; none → cuda if available")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="precision of pipelines and rewards")
    grid_prompts: int = Field(8, ge=0, description="prompt rows in grid.png (0 = no grid)")
    bootstrap_samples: int = Field(2000, ge=100, description="prompt resamples for win-rate intervals")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap")

    @classmethod
    def resolve_file_paths(cls, values: dict[str, Any], folder: Path) -> dict[str, Any]:
        """In an eval YAML file, relative paths are relative to the file: model/LoRA/adapter folders, prompt files
        and reward weights that exist there are rewritten, and `out` is placed next to the file. Model names
        (`toy`), hub ids and prompt specs (`toy:heldout`) are left as they are."""
        values = dict(values)

        def here(value: Any) -> Any:
            if not isinstance(value, str) or Path(value).is_absolute() or not (folder / value).exists():
                return value
            return str(folder / value)

        models = {}
        for name, spec in (values.get("models") or {}).items():
            spec = dict(spec) if isinstance(spec, dict) else spec
            if isinstance(spec, dict):
                spec.update({k: here(spec[k]) for k in ("model", "lora", "negative_adapter", "base") if k in spec})
            models[name] = spec
        if models:
            values["models"] = models
        if isinstance(values.get("prompts"), str):
            prefix, sep, rest = values["prompts"].partition(":")
            values["prompts"] = f"{prefix}:{here(rest)}" if sep and prefix == "pickapic" else here(values["prompts"])
        weight_keys = ("checkpoint", "model", "processor", "head", "pretrained")
        values["rewards"] = (
            [
                {k: here(v) if k in weight_keys else v for k, v in r.items()} if isinstance(r, dict) else r
                for r in values.get("rewards", [])
            ]
            if "rewards" in values
            else None
        )
        if values["rewards"] is None:
            values.pop("rewards")
        if isinstance(values.get("out"), str) and not Path(values["out"]).is_absolute():
            values["out"] = str(folder / values["out"])
        return values

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """`{name: "path"}` means `{name: {model: "path"}}`."""
        if isinstance(value, dict):
            return {k: {"model": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"`seeds` must be a non-empty list of distinct ints, got {value}")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: int | None) -> int | None:
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"`resolution` must be a positive multiple of 8, got {value}")
        return value

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {list(SCHEDULERS)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _baseline(self) -> EvalConfig:
        if not self.models:
            raise ValueError("`models` must name at least one model")
        if self.baseline is not None and self.baseline not in self.models:
            raise ValueError(f"`baseline` {self.baseline!r} is not in `models` ({', '.join(self.models)})")
        return self


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Generate images for every model with paired seeds, score them with every reward, write the outputs to
    `cfg.out` and return the content of `results.json`."""
    for name, spec in cfg.models.items():
        if spec.negative_adapter is not None and not Path(spec.negative_adapter).expanduser().exists():
            raise ConfigError(f"`models.{name}.negative_adapter` {spec.negative_adapter!r} does not exist")
    reward_specs = _reward_specs(cfg.rewards)
    out = Path(cfg.out)
    prompt_set = load_prompts(cfg.prompts).head(cfg.max_prompts)
    logger.info("eval: %d models × %d prompts × %d seeds", len(cfg.models), len(prompt_set), len(cfg.seeds))
    paths = {name: _generate(cfg, name, spec, prompt_set, out) for name, spec in cfg.models.items()}
    texts = [item.text for item in prompt_set.items for _ in cfg.seeds]  # row-major, like the [P, S] path arrays
    scores = {label: _score_models(cfg, name, kwargs, label, paths, texts) for label, name, kwargs in reward_specs}
    results = _results(cfg, prompt_set, scores)
    _write_outputs(cfg, out, prompt_set, paths, scores, results)
    return results


def _reward_specs(rewards: list[str | dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    specs = [parse_spec(r) for r in rewards]
    labels = [label for label, _, _ in specs]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ConfigError(f"`rewards` has duplicate labels {duplicates}; give each a distinct `label`")
    if not specs:
        raise ConfigError("`rewards` must list at least one reward")
    return specs


def _generate(cfg: EvalConfig, name: str, spec: ModelSpec, prompt_set: PromptSet, out: Path) -> np.ndarray:
    """Images of model `name` as an object array `[P, S]` of paths (generated or reused)."""
    root = out / "images" / name
    settings = {
        "model": spec.model,
        "lora": spec.lora,
        "prompts": cfg.prompts,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
        "resolution": cfg.resolution,
        "dtype": cfg.dtype,
    }
    if spec.negative_adapter is not None:  # only then, so folders made before these keys existed stay reusable
        settings.update(negative_adapter=spec.negative_adapter, alpha=spec.alpha, beta=spec.beta, base=spec.base)
    check_settings(root, settings)
    grid = np.empty((len(prompt_set), len(cfg.seeds)), dtype=object)
    for p, item in enumerate(prompt_set.items):
        for s, seed in enumerate(cfg.seeds):
            grid[p, s] = image_path(root, item, seed)
    if all(path.is_file() for path in grid.flat):
        logger.info("%s: all %d images already on disk", name, grid.size)
        return grid
    pipe = load_pipeline(
        spec.model,
        spec.lora,
        cfg.scheduler,
        resolve_device(cfg.device),
        resolve_dtype(cfg.dtype),
        negative_adapter=spec.negative_adapter,
        alpha=spec.alpha,
        beta=spec.beta,
        base=spec.base,
    )
    generate_images(
        pipe,
        prompt_set,
        cfg.seeds,
        root,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        desc=f"generate {name}",
    )
    del pipe
    _release_memory()
    return grid


def _release_memory() -> None:
    """Return the memory of a model the caller just dropped (pipelines and rewards are used one at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _score_models(
    cfg: EvalConfig, name: str, kwargs: dict[str, Any], label: str, paths: dict[str, np.ndarray], texts: list[str]
) -> dict[str, np.ndarray]:
    """Load reward `name` once and score every model's images: `{model: scores [P, S]}`."""
    reward = create(name, **{"device": cfg.device, "dtype": cfg.dtype, "batch_size": cfg.reward_batch_size, **kwargs})
    scores = {}
    for model, grid in paths.items():
        values = score_files(reward, list(grid.flat), texts, desc=f"score {label} · {model}")
        scores[model] = values.reshape(grid.shape)
    del reward
    _release_memory()
    return scores


def score_files(reward, files: list[Path], texts: list[str], desc: str = "score", chunk: int = 64) -> np.ndarray:
    """Scores of image files (read in chunks of `chunk` so memory stays flat) against their `texts`."""
    out = []
    for start in tqdm(range(0, len(files), chunk), desc=desc, unit="chunk"):
        images = []
        for file in files[start : start + chunk]:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        out.append(reward(images, texts[start : start + chunk]).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _results(cfg: EvalConfig, prompt_set: PromptSet, scores: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    models = {m: {label: summarize(scores[label][m]) for label in scores} for m in cfg.models}
    if cfg.baseline is not None:
        pairs = [(m, cfg.baseline) for m in cfg.models if m != cfg.baseline]
    else:
        pairs = list(combinations(cfg.models, 2))
    win_rates = {
        f"{a} vs {b}": {
            label: win_rate(scores[label][a], scores[label][b], cfg.bootstrap_samples, cfg.bootstrap_seed)
            for label in scores
        }
        for a, b in pairs
    }
    results: dict[str, Any] = {"models": models, "win_rates": win_rates}
    if len(prompt_set.groups) > 1:
        results["by_group"] = _by_group(prompt_set, scores, list(cfg.models))
    settings = cfg.model_dump(mode="json")
    settings.update(prompt_set=prompt_set.name, num_prompts=len(prompt_set), diffalign_version=__version__)
    results["settings"] = settings
    return results


def _by_group(prompt_set: PromptSet, scores: dict[str, dict[str, np.ndarray]], models: list[str]) -> dict:
    rows = {g: [i for i, item in enumerate(prompt_set.items) if item.group == g] for g in prompt_set.groups}
    return {
        m: {g: {label: summarize(scores[label][m][idx]) for label in scores} for g, idx in rows.items()}
        for m in models
    }


def _write_outputs(
    cfg: EvalConfig,
    out: Path,
    prompt_set: PromptSet,
    paths: dict[str, np.ndarray],
    scores: dict[str, dict[str, np.ndarray]],
    results: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.jsonl", "w") as f:
        for model, grid in paths.items():
            for (p, s), path in np.ndenumerate(grid):
                item = prompt_set.items[p]
                row = {"model": model, "prompt": item.text, "group": item.group, "index": item.index}
                row.update(seed=cfg.seeds[s], image=str(path.relative_to(out)))
                row.update({label: float(scores[label][model][p, s]) for label in scores})
                f.write(json.dumps(row) + "\n")
    if cfg.grid_prompts:
        rows = np.unique(np.linspace(0, len(prompt_set) - 1, min(cfg.grid_prompts, len(prompt_set))).round())
        first = next(iter(scores), None)  # each tile: its seed and its score under the first reward
        captions = [
            [f"seed {cfg.seeds[0]}" + (f" · {first} {scores[first][m][int(r), 0]:.3g}" if first else "")
             for m in paths]
            for r in rows
        ]  # fmt: skip
        image_grid(
            [[paths[m][int(r), 0] for m in paths] for r in rows],
            [prompt_set.items[int(r)].text for r in rows],
            list(paths),
            out / "grid.png",
            cell_labels=captions,
        )
        results["grid"] = "grid.png"
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown_report(results))
    logger.info("eval: wrote %s", out / "results.json")


def match_images(images_dir: str | Path, prompt_set: PromptSet) -> list[tuple[Path, PromptItem]]:
    """Pair image files with prompts by name: `<index>...png` indexes the prompt file (0-based); in a grouped set
    (HPSv2) the parent folder is the style. A leading `seed<k>/` folder is allowed."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"`images` folder {str(root)!r} does not exist")
    grouped = prompt_set.groups != [""]
    lookup = {(item.group if grouped else "", item.index): item for item in prompt_set.items}
    pairs, unmatched = [], []
    for file in sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()):
        number = re.match(r"\d+", file.stem)
        group = file.parent.name if grouped else ""
        item = lookup.get((group, int(number.group()))) if number else None
        if item is None:
            unmatched.append(str(file.relative_to(root)))
        else:
            pairs.append((file, item))
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} image(s) match no prompt, e.g. {unmatched[:3]}; name images `<index>.png` (0-based "
            f"line of the prompt file{', inside a folder per style' if grouped else ''})"
        )
    if not pairs:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(root)!r}")
    return pairs


def score_images(
    images: str | Path,
    prompts: str,
    rewards: list[str | dict[str, Any]],
    out: str | Path | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    batch_size: int = 16,
) -> dict[str, Any]:
    """Score images made elsewhere (`diffalign score`); writes and returns `scores.json`:
    `{"rewards": {REWARD: {"mean", "std", "n"}}, "images": [{"image", "prompt", REWARD: score}]}`."""
    pairs = match_images(images, load_prompts(prompts))
    files, texts = [f for f, _ in pairs], [item.text for _, item in pairs]
    summary, per_image = {}, [{"image": str(f.relative_to(images)), "prompt": t} for f, t in zip(files, texts)]
    for label, name, kwargs in _reward_specs(rewards):
        reward = create(name, **{"device": device, "dtype": dtype, "batch_size": batch_size, **kwargs})
        values = score_files(reward, files, texts, desc=f"score {label}")
        del reward
        _release_memory()
        summary[label] = summarize(values)
        for row, value in zip(per_image, values):
            row[label] = float(value)
    result = {"rewards": summary, "images": per_image}
    out_file = Path(out or images) / "scores.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    return result
