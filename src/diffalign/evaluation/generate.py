"""Image generation with paired seeds, through stock diffusers pipelines.

Every model sees the same prompts, the same seeds and the same sampler. The image of (prompt, seed) starts from
`torch.Generator("cpu").manual_seed(seed)` — one generator per image, so an image does not depend on which other
prompts share its batch, and model A's image for (prompt, seed) starts from the same noise as model B's. Images are
saved as `<out>/seed<seed>/<group>/<index:05d>.png` (each `seed<k>` folder is one HPSv2-style image folder) and
reused when they already exist, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffalign.config import ConfigError

from .prompts import PromptItem, PromptSet

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def resolve_model_path(model: str) -> str:
    """`"toy"` → the shipped toy pipeline; a local folder must exist; anything else is treated as a hub id."""
    from diffalign.backbones.base import resolve_model_alias

    alias = resolve_model_alias(model)
    if alias is not None:
        return alias
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", ".", "~")):
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"`model` {model!r} is not a diffusers pipeline folder (no model_index.json); pass the folder "
                "written by `save_pretrained`"
            )
        return str(path)
    return model


def load_pipeline(
    model: str,
    lora: str | None = None,
    scheduler: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    negative_adapter: str | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    base: str | None = None,
):
    """A stock `DiffusionPipeline` from `model` (+ LoRA weights in diffusers format), sampler swapped to `scheduler`
    (built from the pipeline's own scheduler config), safety checker off, progress bar off.

    Args:
        model (`str`): pipeline folder, hub id, or `"toy"`.
        lora (`str`, *optional*): a `pytorch_lora_weights.safetensors` file or the folder holding it.
        scheduler (`str`, *optional*): one of `SCHEDULERS`; `None` keeps the pipeline's scheduler.
        negative_adapter (`str`, *optional*): δ for the CFG unconditional branch (NPO / Self-NPO `final/` folder or
            weights file), attached with `diffalign.guidance.attach_negative_adapter` (θ_neg = θ + α·η + β·δ).
        alpha, beta (`float`, *optional*, default 1.0): weights of η (the `lora`, or the model's offset over `base`)
            and of δ in the negative branch.
        base (`str`, *optional*): the base model, needed only for α ≠ 1 with a fully fine-tuned `model`.
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_path(model)
    kwargs: dict[str, Any] = {"dtype": dtype}
    index = Path(path) / "model_index.json"
    if index.is_file() and (json.loads(index.read_text()).get("safety_checker") or [None])[0] is not None:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"`model` {model!r} could not be loaded ({str(err).splitlines()[0][:160]})") from None
    if lora is not None:
        _load_lora(pipe, lora)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if negative_adapter is not None:
        from diffalign.guidance import attach_negative_adapter

        base_path = resolve_model_path(base) if base is not None else None
        attach_negative_adapter(pipe, Path(negative_adapter).expanduser(), alpha=alpha, beta=beta, base=base_path)
    return pipe


def make_scheduler(name: str, config: dict):
    """Scheduler `name` (see `SCHEDULERS`) from another scheduler's `config`."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"`scheduler` must be one of {list(SCHEDULERS)}, got {name!r}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


LORA_FILE = "pytorch_lora_weights.safetensors"
SAMPLING_FILE = "sampling.json"
DEFAULT_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 7.5}


def sampling_defaults(model: str) -> dict:
    """The model's own sampler defaults: `sampling.json` in its pipeline folder (the toy pipeline ships one: 20
    steps, CFG 3), else 25 steps at CFG 7.5."""
    try:
        path = Path(resolve_model_path(model)) / SAMPLING_FILE
    except (FileNotFoundError, ValueError):
        return dict(DEFAULT_SAMPLING)
    return {**DEFAULT_SAMPLING, **json.loads(path.read_text())} if path.is_file() else dict(DEFAULT_SAMPLING)


def _load_lora(pipe, lora: str) -> None:
    path = Path(lora).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"`lora` {lora!r} does not exist; pass a LoRA folder or .safetensors file")
    if path.is_dir() and (path / LORA_FILE).is_file():
        path = path / LORA_FILE  # name the file: offline, older diffusers refuse a folder without `weight_name`
    if path.is_file():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    else:
        pipe.load_lora_weights(str(path))


def image_path(root: str | Path, item: PromptItem, seed: int) -> Path:
    """Where the image of (`item`, `seed`) lives under a model's image folder."""
    return Path(root) / f"seed{seed}" / item.image_name()


def check_settings(root: Path, settings: dict[str, Any]) -> None:
    """Record the generation `settings` in `root/generation.json`; refuse to mix images made with other settings."""
    file = root / "generation.json"
    if file.is_file():
        old = json.loads(file.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            diff = ", ".join(f"`{k}` {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"images in {str(root)!r} were made with other settings ({diff}); use another `out` or delete them"
            )
    root.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(settings, indent=2))


def generate_images(
    pipe,
    prompt_set: PromptSet,
    seeds: Sequence[int],
    out_dir: str | Path,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    batch_size: int = 8,
    desc: str = "generate",
) -> dict[tuple[int, int], Path]:
    """Generate one image per (prompt, seed), skipping images already on disk.

    Returns:
        `{(prompt_position, seed): path}` for every prompt of `prompt_set` and every seed.
    """
    if resolution is not None and resolution % 8:
        raise ConfigError(f"`resolution` must be divisible by 8, got {resolution}")
    paths = {(i, s): image_path(out_dir, item, s) for s in seeds for i, item in enumerate(prompt_set.items)}
    todo = [key for key, path in paths.items() if not path.is_file()]
    if len(todo) < len(paths):
        logger.info("%s: reusing %d of %d images in %s", desc, len(paths) - len(todo), len(paths), out_dir)
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch"):
        batch = todo[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
        result = pipe(
            prompt=[prompt_set.items[i].text for i, _ in batch],
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            **size,
        )
        for key, image in zip(batch, result.images):
            _save_png(image, paths[key])
    return paths


def _save_png(image, path: Path) -> None:
    """Write to a temporary name first, so an interrupted run never leaves a truncated image to be reused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp, format="PNG")
    tmp.replace(path)
