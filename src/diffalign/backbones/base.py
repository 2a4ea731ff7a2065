"""The shared adapter layer: one interface over SD1.x/2.x, SDXL, SD3-family and FLUX.1 models.

Trainers only ever talk to a `Backbone`. Every noising process used here is written as

    x_t = alpha_t * x0 + sigma_t * eps

with `(alpha_t, sigma_t) = (sqrt(ᾱ_t), sqrt(1 - ᾱ_t))` for the DDPM/VP family (SD1.x/2.x, SDXL) and
`(1 - σ, σ)` for rectified flow (SD3 family, FLUX.1). All conversions between x0, ε, v and the model output follow from
`alpha_sigma(t)`, so trainers never need to know which family they are training.

Shapes: `N` = number of images in a call (2B for a DPO batch of B pairs); latents are `[N, C, h, w]`.
"""

from __future__ import annotations

import inspect
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn


class Backbone(ABC):
    """A text-to-image diffusion model seen as: encoders, a denoiser, and a noising process.

    Class attributes (capabilities):
        family (`str`): `"sd"`, `"sdxl"`, `"sd3"` or `"flux"`.
        denoiser_subfolder (`str`): `"unet"` or `"transformer"`; where `save_full` writes.
        lora_target_modules (`tuple[str, ...]`): module names LoRA attaches to by default.

    Instance attributes:
        denoiser (`nn.Module`): the trainable network (UNet2DConditionModel / SD3Transformer2DModel).
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"flow_matching"`.
        num_train_timesteps (`int`): T of the training noise schedule.
        device, frozen_dtype: where the frozen parts (VAE, text encoders) live and in which precision.
    """

    family: ClassVar[str]
    denoiser_subfolder: ClassVar[str]
    lora_target_modules: ClassVar[tuple[str, ...]]

    denoiser: nn.Module
    prediction_type: str
    num_train_timesteps: int

    # ---- loading / moving -------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(
        cls, path_or_id: str | Path, *, frozen_dtype: torch.dtype = torch.float32, variant: str | None = None
    ) -> Backbone:
        """Load from a local diffusers pipeline directory (or a hub id when online)."""

    @abstractmethod
    def to(self, device: torch.device | str, frozen_dtype: torch.dtype | None = None) -> Backbone:
        """Move all components; the denoiser keeps fp32 master weights, frozen parts take `frozen_dtype`."""

    # ---- encoders (always no-grad, frozen) --------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for `prompts`; every tensor has batch dim first (`[N, ...]`) so it can be cached,
        indexed and concatenated. `""` is the unconditional prompt."""

    @torch.no_grad()
    def unconditional_embeddings(self) -> dict[str, torch.Tensor]:
        """The text conditioning of CFG's unconditional branch, batch 1, as the model's own pipeline builds it when
        no negative prompt is given: `encode_prompts([""])` unless the backbone overrides it."""
        return self.encode_prompts([""])

    def check_cfg_branch(self, purpose: str) -> None:
        """Raise (a `ValueError` naming why) when `purpose` needs classifier-free guidance's unconditional branch and
        the model has none — a guidance-distilled FLUX.1-dev; every other family has one."""
        return None

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` in [-1, 1], `[N, 3, H, W]` → latents scaled for the denoiser (`[N, C, H/f, W/f]`)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_images`: scaled latents → pixels in [-1, 1]."""

    def build_condition(
        self,
        prompt_embeds: dict[str, torch.Tensor],
        original_size: torch.Tensor | None = None,
        crop_top_left: torch.Tensor | None = None,
        target_size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Everything `predict` needs besides `x_t, t`. `original_size` and `crop_top_left` are `[N, 2]` (h, w)
        pixel coordinates of the image before resize and of the crop; only SDXL uses them (micro-conditioning)."""
        return prompt_embeds

    # ---- noising process --------------------------------------------------------------------------------------
    @abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` training timesteps in the denoiser's own units (long in [0, T) for DDPM, float for flow)."""

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(alpha_t, sigma_t)`, each `[N]` float32 on `t.device`, with x_t = alpha_t·x0 + sigma_t·ε."""

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (_bcast(v, x0) for v in self.alpha_sigma(t))
        return alpha * x0 + sigma * eps

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser regresses: ε, v = alpha·ε − sigma·x0, or the flow velocity ε − x0."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            alpha, sigma = (_bcast(v, x0) for v in self.alpha_sigma(t))
            return alpha * eps - sigma * x0
        if self.prediction_type == "flow_matching":
            return eps - x0
        raise ValueError(f"unknown `prediction_type` {self.prediction_type!r}")

    def pred_to_x0_eps(
        self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output → (x0 estimate, ε estimate), for any prediction type."""
        alpha, sigma = (_bcast(v, x_t) for v in self.alpha_sigma(t))
        if self.prediction_type == "epsilon":
            eps = pred
            x0 = (x_t - sigma * eps) / alpha
        elif self.prediction_type == "v_prediction":
            # alpha² + sigma² = 1 for VP schedules
            x0 = alpha * x_t - sigma * pred
            eps = sigma * x_t + alpha * pred
        elif self.prediction_type == "flow_matching":
            # x_t = (1-σ)x0 + σε, pred = ε - x0
            x0 = x_t - sigma * pred
            eps = x_t + alpha * pred
        else:
            raise ValueError(f"unknown `prediction_type` {self.prediction_type!r}")
        return x0, eps

    # ---- the network ------------------------------------------------------------------------------------------
    @abstractmethod
    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """Denoiser output (same space as `training_target`) for latents `x_t` at timesteps `t` (`[N]`).
        `denoiser` overrides `self.denoiser` (used for a frozen reference copy)."""

    def add_lora(self, rank: int, alpha: float | None = None, target_modules: tuple[str, ...] | None = None) -> None:
        """Attach a peft LoRA adapter (named `"default"`) to the denoiser; only its weights stay trainable."""
        from peft import LoraConfig

        self.denoiser.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights="gaussian",
            target_modules=list(target_modules or self.lora_target_modules),
        )
        self.denoiser.add_adapter(config)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.denoiser.enable_gradient_checkpointing()
        else:
            self.denoiser.disable_gradient_checkpointing()

    def set_attention(self, requested: str = "sdpa") -> str:
        """Pick the denoiser's attention implementation (`"sdpa"`, `"xformers"` or `"eager"`) for the current
        device, falling back to `"sdpa"` with a warning when xformers cannot run; returns what was applied."""
        from diffalign.backbones.attention import apply_attention, resolve_attention

        kind = resolve_attention(requested, getattr(self, "device", torch.device("cpu")))
        apply_attention(self.denoiser, kind)
        return kind

    # ---- outputs ----------------------------------------------------------------------------------------------
    @abstractmethod
    def save_lora(self, out_dir: str | Path, denoiser: nn.Module | None = None) -> Path:
        """Write `pytorch_lora_weights.safetensors` in diffusers key format (loads with a stock pipeline's
        `load_lora_weights`). Returns the file path."""

    def save_full(self, out_dir: str | Path, denoiser: nn.Module | None = None) -> Path:
        """`save_pretrained` the denoiser into `out_dir/<denoiser_subfolder>`; returns that folder."""
        folder = Path(out_dir) / self.denoiser_subfolder
        unwrap(denoiser or self.denoiser).save_pretrained(folder)
        return folder

    @abstractmethod
    def make_pipeline(self, denoiser: nn.Module | None = None):
        """A stock diffusers pipeline sharing this backbone's components (for validation images / evaluation)."""


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[N]` → `[N, 1, 1, ...]` matching `like`'s rank and dtype."""
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


# ---- loading helpers shared by every family ----------------------------------------------------------------------
class ModelNotFoundError(FileNotFoundError):
    """`model` is neither a local diffusers pipeline folder nor something the Hub can serve right now."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` is set (read at call time, so tests and users can flip it late)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def resolve_model_alias(name: str) -> str | None:
    """The pipeline folder a model plug-in name stands for (`toy`: the shipped toy pipeline; `diffalign.models`
    entry points, see `diffalign.plugins`), or None when `name` is not one. A local path of that name wins."""
    if Path(name).expanduser().exists():
        return None
    from diffalign import plugins

    folder = plugins.load("models", name)
    return None if folder is None else str(folder())


def resolve_model_path(path_or_id: str | Path) -> str:
    """Check `path_or_id` before anything is loaded, so a missing model is a one-line error and never a hang.
    A model plug-in name (`toy`, see `resolve_model_alias`) resolves to its folder first.

    A local folder must hold `model_index.json`. Anything else must look like a Hub id (`org/name`) and the Hub
    must be online; then it is returned unchanged for `from_pretrained` to download.

    Raises:
        ModelNotFoundError: the folder has no `model_index.json`, or the name is not local and cannot be fetched.
    """
    text = str(path_or_id)
    text = resolve_model_alias(text) or text
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"`model` '{text}' is a folder but not a diffusers pipeline directory (no model_index.json); "
                "pass the path of a local pipeline folder"
            )
        return str(local)
    if hub_offline():
        raise ModelNotFoundError(
            f"`model` '{text}' is not a local diffusers pipeline directory (no model_index.json) and the Hub is "
            "offline; pass the path of a local pipeline folder"
        )
    if not _HUB_ID.match(text):
        raise ModelNotFoundError(
            f"`model` '{text}' is not a local diffusers pipeline directory (no model_index.json) nor a Hub id "
            "like 'org/name'; pass the path of a local pipeline folder"
        )
    return text


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP/FSDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel) or type(module).__name__ in _WRAPPERS:
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


_WRAPPERS = {"FullyShardedDataParallel", "DataParallel", "DeepSpeedEngine"}


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(unwrap(module).parameters()).dtype


class PipelineBackbone(Backbone):
    """A `Backbone` backed by a stock diffusers pipeline class: loading, moving, VAE, LoRA export and pipelines.

    Subclasses set `pipeline_class`, `lora_layers_kwarg` (the argument of `pipeline_class.save_lora_weights` that
    takes the denoiser's LoRA layers) and implement the text encoders, the noising process and `predict`.

    Instance attributes:
        components (`dict`): the pipeline's components (`vae`, `text_encoder`, `tokenizer`, ..., `scheduler`).
        vae (`AutoencoderKL`), scheduler (the pipeline's own inference scheduler).
        vae_scale_factor (`int`): pixels per latent side.
    """

    pipeline_class: ClassVar[type]
    lora_layers_kwarg: ClassVar[str]
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe, frozen_dtype: torch.dtype = torch.float32):
        self.components = dict(pipe.components)
        self.pipeline_init_kwargs = self._init_kwargs(pipe)
        self.denoiser = self.components[self.denoiser_subfolder]
        self.vae = self.components["vae"]
        self.scheduler = self.components["scheduler"]
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.device = torch.device("cpu")
        self.frozen_dtype = frozen_dtype
        for module in self._frozen_modules().values():
            module.requires_grad_(False)
            module.eval()

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, *, frozen_dtype: torch.dtype = torch.float32, variant: str | None = None
    ) -> PipelineBackbone:
        """Load with `pipeline_class.from_pretrained`: the denoiser in fp32 (master weights), every frozen part in
        `frozen_dtype`. Components saved as `null` in `model_index.json` (e.g. SD3 without T5) stay `None`."""
        path = resolve_model_path(path_or_id)
        config = cls.pipeline_class.load_config(path)
        absent = {k: None for k, v in config.items() if isinstance(v, (list, tuple)) and list(v) == [None, None]}
        # fp32 master weights for the denoiser; the VAE loads in fp32 too and `to()` casts it down unless it is
        # flagged `force_upcast` and the precision is fp16
        full = {cls.denoiser_subfolder: torch.float32, "vae": torch.float32}
        dtype = frozen_dtype if frozen_dtype == torch.float32 else {"default": frozen_dtype, **full}
        pipe = cls.pipeline_class.from_pretrained(
            path, variant=variant, **_dtype_kwarg(dtype), **{**absent, **cls._load_overrides()}
        )
        return cls(pipe, frozen_dtype).to("cpu", frozen_dtype)

    @classmethod
    def _load_overrides(cls) -> dict:
        """Extra `from_pretrained` kwargs (SD drops the safety checker)."""
        return {}

    def _init_kwargs(self, pipe) -> dict:
        """Non-module `__init__` arguments of the pipeline (`force_zeros_for_empty_prompt`...) for `make_pipeline`."""
        params = inspect.signature(self.pipeline_class.__init__).parameters
        return {k: v for k, v in pipe.config.items() if k in params and k not in pipe.components}

    def _frozen_modules(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.components.items() if isinstance(v, nn.Module) and k != self.denoiser_subfolder}

    def _vae_dtype(self, frozen_dtype: torch.dtype) -> torch.dtype:
        # VAEs flagged `force_upcast` (SD, SDXL) overflow in fp16's range: keep them in fp32 there. bf16 has fp32's
        # range, so they run in bf16 (the stock pipelines' rule: upcast only when the VAE is float16; the diffusers
        # DPO script runs the SD1.5 VAE in the weight dtype too)
        upcast = self.vae.config.get("force_upcast", False) and frozen_dtype == torch.float16
        return torch.float32 if upcast else frozen_dtype

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype | None = None) -> PipelineBackbone:
        device = torch.device(device)
        frozen_dtype = frozen_dtype or self.frozen_dtype
        self.denoiser.to(device)
        for name, module in self._frozen_modules().items():
            dtype = self._vae_dtype(frozen_dtype) if name == "vae" else frozen_dtype
            # cast only on a real change: keeps modules that from_pretrained left partly in fp32 (T5's `wo`) intact
            module.to(device) if module_dtype(module) == dtype else module.to(device, dtype=dtype)
        self.device, self.frozen_dtype = device, frozen_dtype
        return self

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """The pipeline's `force_zeros_for_empty_prompt` config (SDXL: from `model_index.json`, default `True`);
        `False` for pipelines without that option (SD1.x/2.x, SD3), which encode `""`."""
        return bool(self.pipeline_init_kwargs.get("force_zeros_for_empty_prompt", False))

    @torch.no_grad()
    def unconditional_embeddings(self) -> dict[str, torch.Tensor]:
        """CFG's unconditional conditioning by the pipeline's own rule: all zeros (every tensor, pooled included)
        when `force_zeros_for_empty_prompt` is set, as `StableDiffusionXLPipeline.encode_prompt` does without a
        negative prompt; otherwise the encoded empty prompt `""`."""
        empty = self.encode_prompts([""])
        if self.force_zeros_for_empty_prompt:
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    # ---- VAE -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` in [-1, 1] → `(mean − shift_factor) · scaling_factor`, float32.

        Deterministic on purpose: the posterior MEAN (mode) is used, never a sample, so no `generator` is needed and
        cached latents are exactly what a fresh encode gives. `shift_factor` is 0 for SD/SDXL VAEs.
        """
        x = pixels.to(self.device, self.vae.dtype)
        mean = self.vae.encode(x).latent_dist.mode()
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((mean.float() - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_images`: `latents / scaling_factor + shift_factor` through the decoder, clamped to
        [-1, 1], float32."""
        shift = self.vae.config.get("shift_factor") or 0.0
        z = latents.float() / self.vae.config.scaling_factor + shift
        return self.vae.decode(z.to(self.device, self.vae.dtype)).sample.float().clamp(-1, 1)

    # ---- outputs -------------------------------------------------------------------------------------------------
    def save_lora(self, out_dir: str | Path, denoiser: nn.Module | None = None) -> Path:
        """Write the `"default"` adapter as `pytorch_lora_weights.safetensors` in diffusers key format with
        `pipeline_class.save_lora_weights`, including the adapter config (`lora_alpha`, rank) as metadata so a
        stock pipeline's `load_lora_weights` applies the same scale. Returns the file path."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        net = unwrap(denoiser or self.denoiser)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(net))
        kwargs = {self.lora_layers_kwarg: layers}
        metadata_kwarg = self.lora_layers_kwarg.replace("_layers", "_adapter_metadata")
        if metadata_kwarg in inspect.signature(self.pipeline_class.save_lora_weights).parameters:
            meta = net.peft_config["default"].to_dict()
            if isinstance(meta.get("target_modules"), (set, list)):  # a set: hash order would change the file bytes
                meta["target_modules"] = sorted(meta["target_modules"])
            kwargs[metadata_kwarg] = meta
        out_dir = Path(out_dir)
        self.pipeline_class.save_lora_weights(out_dir, safe_serialization=True, **kwargs)
        return out_dir / "pytorch_lora_weights.safetensors"

    def make_pipeline(self, denoiser: nn.Module | None = None):
        """A stock `pipeline_class` over this backbone's modules (shared, not copied) with `denoiser` (default: the
        trained one) and a fresh copy of the inference scheduler; progress bar off.

        The denoiser keeps fp32 weights while frozen parts may be half precision: call it under `torch.autocast`
        when `frozen_dtype` is not float32.
        """
        components = {
            **self.components,
            self.denoiser_subfolder: unwrap(denoiser or self.denoiser),
            "scheduler": type(self.scheduler).from_config(self.scheduler.config),
        }
        pipe = self.pipeline_class(**components, **self.pipeline_init_kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ---- shared pieces for subclasses ----------------------------------------------------------------------------
    def _token_ids(self, tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    def _net_and_dtype(self, denoiser: nn.Module | None) -> tuple[nn.Module, torch.dtype]:
        net = denoiser if denoiser is not None else self.denoiser
        return net, module_dtype(net)


def _dtype_kwarg(dtype) -> dict:
    """diffusers renamed `from_pretrained(torch_dtype=...)` to `dtype=` (huggingface/diffusers#14205); only the
    releases that accept `dtype` ship the `_resolve_dtype` helper."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}
