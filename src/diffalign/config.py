"""Typed configs: defaults < YAML preset < `--key value` flags.

Every config is a pydantic model with `extra="forbid"`: an unknown key is an error that lists the known keys, and a
bad value names the key, the value received and what was expected.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and says what was expected."""


class StrictConfig(BaseModel):
    """Base of every diffalign config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @classmethod
    def resolve_file_paths(cls, values: dict[str, Any], folder: Path) -> dict[str, Any]:
        """Rewrite relative paths of a YAML file's `values` against the file's `folder` (configs override this)."""
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_YAML11_WORDS = {"yes", "no", "on", "off", "y", "n"}


def _parse_value(value: str) -> Any:
    """A flag value as a YAML scalar or list, except YAML 1.1's word booleans: `--mixed_precision no` must stay the
    string `"no"` (pydantic still reads `yes`/`no`/`on`/`off` as booleans for boolean keys)."""
    if value == "":
        return ""
    if value.lower() in _YAML11_WORDS:
        return value
    return yaml.safe_load(value)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--beta", "500", "--lora_rank=8", "--no-gradient_checkpointing"]` → `{"beta": 500, ...}`.

    Values are parsed as YAML scalars/lists (`500` → int, `true` → bool, `[1, 2]` → list); a bare `--flag` is `true`
    and `--no-flag` is `false`. Dashes in keys become underscores.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected `--key value`, got {arg!r}")
        key, value = arg[2:], None
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 1
        key = key.replace("-", "_")
        if value is None:
            if key.startswith("no_") and key not in DIFFUSERS_FLAG_ALIASES:
                key, parsed = key[3:], False
            else:
                parsed = True
        else:
            parsed = _parse_value(value)
        out[key] = parsed
        i += 1
    return out


PRESET_DIR = Path(__file__).parent / "configs"


def available_presets() -> list[str]:
    """Names of the YAML presets shipped with diffalign (`--config sd15_dpo_lora` finds them)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file path, or the name of a shipped preset (with or without `.yaml`)."""
    path = Path(path)
    if path.is_file():
        return path
    preset = PRESET_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if preset.is_file() and path.parent in (Path("."), Path("configs")):
        return preset
    raise ConfigError(
        f"`config` {str(path)!r} is neither a file nor a shipped preset; presets: {', '.join(available_presets())}"
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"`config` file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"`config` file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _check_known(cls: type[BaseModel], values: dict[str, Any], source: str) -> None:
    """An unknown key is a `ConfigError` naming `source`, the key, a close match and the known keys."""
    known = list(cls.model_fields)
    unknown = [k for k in values if k not in cls.model_fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"unknown key(s) {', '.join(hints)} in {source} for {cls.__name__}; known keys: {', '.join(known)}"
        )


def build_config(cls: type[C], *layers: dict[str, Any], source: str = "config") -> C:
    """Merge `layers` (later wins) into `cls`, turning pydantic errors into one readable `ConfigError`."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    _check_known(cls, merged, source)
    try:
        return cls(**merged)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "config"
            if e["type"] == "missing":
                lines.append(f"`{loc}` is required (set it in the YAML or pass `--{loc} ...`)")
            else:
                lines.append(f"`{loc}`: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
        raise ConfigError(f"invalid {source} for {cls.__name__}: " + "; ".join(lines)) from None


# Flags of the diffusers research Diffusion-DPO scripts (examples/research_projects/diffusion_dpo) → diffalign keys,
# so a pasted command line works. (key, convert); `beta_dpo` is in the diffusers convention without the ½ of the
# official code: β here = 2 × beta_dpo (see the README's β conventions).
DIFFUSERS_FLAG_ALIASES: dict[str, tuple[str, Any]] = {
    "pretrained_model_name_or_path": ("model", None),
    "dataset_name": ("data", None),
    "train_batch_size": ("batch_size", None),
    "max_train_steps": ("max_steps", None),
    "rank": ("lora_rank", None),
    "beta_dpo": ("beta", lambda v: 2 * float(v)),
    "resume_from_checkpoint": ("resume", None),
    "tracker_name": ("tracker_project_name", None),
    "use_8bit_adam": ("optimizer", lambda v: "adamw8bit" if v else "adamw"),
    "enable_xformers_memory_efficient_attention": ("attention", lambda v: "xformers" if v else "sdpa"),
    "random_crop": ("center_crop", lambda v: not v),
    "no_hflip": ("random_flip", lambda v: not v),
}
UNSUPPORTED_DIFFUSERS_FLAGS = {
    "pretrained_vae_model_name_or_path": "put the VAE into the pipeline folder's `vae/` instead",
    "revision": "download the revision into a local folder and pass it as `--model`",
    "max_train_samples": "filter the data table instead",
    "num_train_epochs": "use `--max_steps`",
    "vae_encode_batch_size": "use `--cache_latents true` to encode each image once",
    "run_validation": "use `--validation_steps N --validation_prompts '[...]'`",
    "logging_dir": "trackers write into `output_dir`",
    "hub_token": "log in with `huggingface-cli login` (or set HF_TOKEN)",
}


def _check_bare_flags(cls: type[BaseModel], args: list[str], flags: dict[str, Any]) -> None:
    """A bare `--key` means `true`; for a key that is not a boolean it is a forgotten value, not the number 1."""
    for i, arg in enumerate(args):
        if not arg.startswith("--") or "=" in arg or (i + 1 < len(args) and not args[i + 1].startswith("--")):
            continue
        key = arg[2:].replace("-", "_")
        field = cls.model_fields.get(key)
        if field is not None and flags.get(key) is True and field.annotation is not bool:
            raise ConfigError(
                f"`--{key}` needs a value (e.g. `--{key} {field.get_default(call_default_factory=True)}`)"
            )


def translate_aliases(overrides: dict[str, Any], source: str = "flags") -> dict[str, Any]:
    """Rename the diffusers research scripts' flags to diffalign keys (converting values where the conventions
    differ); an unsupported one, or an alias given together with its key, is a `ConfigError`."""
    out = {k: v for k, v in overrides.items() if k not in DIFFUSERS_FLAG_ALIASES}
    for flag, value in overrides.items():
        if flag in UNSUPPORTED_DIFFUSERS_FLAGS:
            raise ConfigError(
                f"`--{flag}` (diffusers script flag) is not supported: {UNSUPPORTED_DIFFUSERS_FLAGS[flag]}"
            )
        if flag not in DIFFUSERS_FLAG_ALIASES:
            continue
        key, convert = DIFFUSERS_FLAG_ALIASES[flag]
        if key in overrides:
            raise ConfigError(f"`--{flag}` and `--{key}` name the same key in {source}; give one of them")
        out[key] = convert(value) if convert else value
        logging.getLogger(__name__).info("flag `--%s %s` read as `--%s %s`", flag, value, key, out[key])
    return out


def load_config(cls: type[C], config_path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults of `cls` < YAML file at `config_path` < `--key value` `overrides` (for training configs the diffusers
    research scripts' flag names are accepted too, `DIFFUSERS_FLAG_ALIASES`)."""
    file_layer = read_yaml(config_path) if config_path else {}
    if config_path and Path(config_path).is_file():  # a user's file (shipped presets stay relative to the cwd)
        file_layer = cls.resolve_file_paths(file_layer, Path(config_path).resolve().parent)
    flags = parse_overrides(overrides or [])
    _check_bare_flags(cls, overrides or [], flags)
    if issubclass(cls, TrainConfig):
        flags = translate_aliases(flags)
    if config_path:
        _check_known(cls, file_layer, f"config file {str(config_path)!r}")
    _check_known(cls, flags, "command-line flags")
    return build_config(cls, file_layer, flags, source=str(config_path or "flags"))


class TrainConfig(StrictConfig):
    """Keys every trainer understands (DESIGN.md). Method configs subclass this and add their own."""

    # --- model & data -------------------------------------------------------------------------------------------
    model: str = Field(description="Local diffusers pipeline folder (or a hub id when online).")
    variant: str | None = Field(None, description="Weights variant to load, e.g. `fp16`.")
    data: str = Field(description="Dataset: parquet file/folder, arrow, save_to_disk folder, JSONL or imagefolder.")
    caption_column: str = "caption"
    resolution: int = Field(512, description="Training resolution in pixels (square crops); divisible by 8.")
    center_crop: bool = Field(True, description="Centre crop (True) or random crop (False) after resizing.")
    random_flip: bool = Field(False, description="Random horizontal flip; both images of a pair flip together.")
    proportion_empty_prompts: float = Field(0.0, ge=0.0, le=1.0, description="Captions replaced by '' (CFG).")
    cache_latents: bool = Field(False, description="Pre-encode images and captions once (exact for centre crops).")
    cache_dir: str | None = Field(None, description="Cache folder; defaults to `<output_dir>/cache`.")
    dataloader_num_workers: int = Field(0, ge=0)

    # --- outputs ------------------------------------------------------------------------------------------------
    output_dir: str = Field("runs/train", description="Where metrics.jsonl, checkpoint-<step>/ and final/ go.")
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    tracker_project_name: str = "diffalign"
    checkpointing_steps: int = Field(500, ge=0, description="Save a resumable checkpoint every N steps (0 = never).")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    resume: str | None = Field(None, description="`latest` or a checkpoint-<step> folder to resume from.")
    init_from: str | None = Field(
        None,
        description="Weights-only start: a run folder, its final/ or a checkpoint-<step>/ whose trained weights "
        "(same LoRA layout) begin this run at step 0 with a fresh optimizer; any method. The reference stays `model`.",
    )
    push_to_hub: bool = Field(False, description="Upload final/ (with a model card) to `hub_model_id` at the end.")
    hub_model_id: str | None = Field(None, description="Hub repo id for `push_to_hub`, e.g. `me/dpo-sd15-lora`.")
    validation_steps: int = Field(0, ge=0, description="Write validation images every N steps (0 = never).")
    validation_prompts: list[str] = Field(default_factory=list)
    validation_num_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    validation_seed: int = Field(0, description="Seed of the first validation prompt (prompt i uses seed + i).")
    validation_data: str | None = Field(
        None, description="Held-out table (the training data's format): val/loss, val/implicit_acc every N steps."
    )
    validation_max_samples: int = Field(256, ge=1, description="Rows of `validation_data` used per validation.")
    validation_reward: str | dict[str, Any] | None = Field(
        None, description="Reward (registry name or {name: ..., ...}) scoring the validation images: val/reward."
    )

    # --- what to train ------------------------------------------------------------------------------------------
    lora_rank: int = Field(8, ge=0, description="LoRA rank; 0 = full fine-tune (reference = frozen copy).")
    lora_alpha: float | None = Field(None, description="LoRA alpha; defaults to the rank (scale 1).")
    lora_target_modules: list[str] | None = Field(None, description="Default: the backbone's attention projections.")
    beta: float = Field(5000.0, gt=0, description="KL strength β of the objective (see the method's docs).")

    # --- optimisation -------------------------------------------------------------------------------------------
    learning_rate: float = Field(1e-5, gt=0)
    scale_lr: bool = Field(False, description="Multiply learning_rate by the effective batch (official DPO recipe).")
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Steps in a row with a non-finite loss/gradients (each skipped) before the run stops."
    )
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1, description="Per-device micro-batch (pairs for pairwise methods).")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(2000, ge=1, description="Optimizer steps.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an EMA of trained weights; final/ uses it.")

    # --- hardware -----------------------------------------------------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    attention: Literal["sdpa", "xformers", "eager"] = "sdpa"
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    seed: int = 0
    base_quantization: Literal["none", "int8", "fp8", "nf4"] = Field(
        "none",
        description="LoRA only: hold the frozen base (also the reference) in int8, fp8 or nf4 (torchao, the `quant` "
        "extra); LoRA weights and optimizer stay fp32.",
    )
    offload_text_encoders: bool = Field(
        False,
        description="With `cache_latents`: release the text encoders once every caption is cached (frees e.g. T5).",
    )

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, v: int) -> int:
        if v <= 0 or v % 8:
            raise ValueError(f"`resolution` must be a positive multiple of 8, got {v}")
        return v

    @field_validator("base_quantization")
    @classmethod
    def _quantization_needs_lora(cls, v: str, info: ValidationInfo) -> str:
        if v != "none" and info.data.get("lora_rank") == 0:
            raise ValueError(
                f"`base_quantization: {v}` quantises the frozen base of a LoRA run, but `lora_rank: 0` is a full "
                "fine-tune (every weight trains); set `lora_rank` > 0 or `base_quantization: none`"
            )
        return v

    @field_validator("offload_text_encoders")
    @classmethod
    def _offload_needs_cache(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("cache_latents"):
            raise ValueError("`offload_text_encoders` releases the text encoders after caching: set `cache_latents`")
        needs = [k for k in ("validation_prompts", "validation_data") if info.data.get(k)]
        if v and needs:
            raise ValueError(
                f"`offload_text_encoders` releases the text encoders, but `{needs[0]}` needs them (validation images "
                "and held-out losses encode their captions); drop one of the two"
            )
        return v

    @field_validator("resume")
    @classmethod
    def _resume_none(cls, v: str | None) -> str | None:
        return None if v in (None, "", "none", "None") else v
