"""Negative-adapter classifier-free guidance inside stock diffusers pipelines (Diffusion-NPO, Wang et al. 2025).

Classifier-free guidance pushes each step away from the unconditional branch. NPO puts weights that PREFER what
people dislike into that branch, so guidance pushes away from the dislikes too:

    ε = ε_neg(x_t, ∅ or negative prompt) + s · (ε_pos(x_t, c) − ε_neg(x_t, ∅ or negative prompt))
    θ_neg = θ_base + α·η + β·δ = θ_pipe − (1 − α)·η + β·δ

How it works in a stock pipeline. `StableDiffusionPipeline`, `StableDiffusionXLPipeline` and
`StableDiffusion3Pipeline` stack `[uncond, cond]` into ONE denoiser call when `do_classifier_free_guidance`, after
`scheduler.scale_model_input` has been applied to the stacked batch — so both halves already carry the scheduler's
input scaling, whatever the scheduler. `attach_negative_adapter` wraps the denoiser's `forward`; while the pipeline is
guiding, the first half of every call sees θ_neg and the second half θ_pipe, and the pipeline's guidance formula,
rescale and scheduler step are untouched.

No second copy of the network when δ is a LoRA: δ becomes a peft adapter named `"negative"`, and the stacked call
stays ONE call in which the adapter's output is multiplied per row by β (uncond rows) or exactly 0 (cond rows) — the
cond half is therefore bit-identical to plain CFG, and with δ = 0 the whole sample is. α ≠ 1 with a LoRA η (the
pipeline's own adapters) multiplies those adapters' outputs by α on the uncond rows in the same way. Dense parts
(a dense δ, or α ≠ 1 with `base` for a fine-tuned checkpoint) cannot vary per row: then the call is split in two and
the precomputed θ_neg = θ_pipe − (1 − α)(θ_pipe − θ_base) + β·δ of the parameters that differ is swapped in for the
uncond half.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .offsets import (
    base_state_dict,
    denoiser_name,
    dense_negative_weights,
    dense_parameters,
    load_negative,
)

logger = logging.getLogger(__name__)

ADAPTER_NAME = "negative"
_ATTR = "_diffalign_negative_guidance"


class NegativeAdapterHandle:
    """What `attach_negative_adapter` returns: the attached state, `negative_weights()` to run code with θ_neg, and
    `remove()` to restore the pipeline exactly as it was (weights, adapters, `forward`, `requires_grad` flags).

    Attributes:
        alpha, beta (`float`): the weights of η and δ.
        dense (`dict[str, torch.Tensor]`): θ_neg of the parameters whose dense weights change in the negative branch
            (empty for a LoRA δ with α = 1 or a LoRA η).
        removed (`bool`): whether `remove()` ran.
    """

    def __init__(self, pipe, alpha: float, beta: float):
        self.pipe = pipe
        self.component = denoiser_name(pipe)
        self.denoiser: nn.Module = getattr(pipe, self.component)
        self.alpha, self.beta = float(alpha), float(beta)
        self.dense: dict[str, torch.Tensor] = {}
        self.removed = False
        self._params = dense_parameters(self.denoiser)
        self._had_peft = _lora_layers(self.denoiser) != []
        self._requires_grad = [(p, p.requires_grad) for p in self.denoiser.parameters()]
        self._active = {layer: list(layer.active_adapters) for layer in _lora_layers(self.denoiser)}
        self._neg_layers: list[tuple[Any, float]] = []  # (layer, the adapter's own scale lora_alpha / r)
        self._eta_layers: list[tuple[Any, str, float]] = []  # (layer, η adapter, its scale in the pipeline)
        self._hooks: list = []
        self._rows: dict[str, torch.Tensor] = {}  # per-row output factors during a stacked call
        self._all_negative = False  # inside `negative_weights()`: every row of every call sees θ_neg
        self._forward = None

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _check_layers(self) -> None:
        for layer in _lora_layers(self.denoiser):
            if layer.merged or layer.disable_adapters:
                raise ValueError(
                    "`pipe`'s denoiser has fused or disabled LoRA layers; call `pipe.unfuse_lora()` / "
                    "`pipe.enable_lora()` (or `unload_lora_weights()` after fusing) before attaching a negative "
                    "adapter"
                )

    def _add_lora(self, offset) -> None:
        """Load δ as the peft adapter `"negative"`, active in every layer that has it, at scale 0 outside guided
        calls; a hook on its `lora_B` applies the per-row factors."""
        with warnings.catch_warnings():  # "multiple adapters in the model": intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.denoiser.load_lora_adapter(
                offset.state_dict,
                prefix=self.component,
                network_alphas=offset.network_alphas,
                adapter_name=ADAPTER_NAME,
                metadata=offset.metadata if not offset.network_alphas else None,  # diffusers takes one or the other
                _pipeline=self.pipe,
            )
        for layer in _lora_layers(self.denoiser):
            if ADAPTER_NAME not in layer.lora_A:
                continue
            if ADAPTER_NAME in getattr(layer, "lora_variant", {}):
                raise NotImplementedError("negative adapters with a LoRA variant (DoRA, ...) are not supported")
            layer.set_adapter([n for n in self._active.get(layer, []) if n != ADAPTER_NAME] + [ADAPTER_NAME])
            self._neg_layers.append((layer, float(layer.scaling[ADAPTER_NAME])))
            layer.scaling[ADAPTER_NAME] = 0.0
            self._hooks.append(layer.lora_B[ADAPTER_NAME].register_forward_hook(self._row_hook("neg")))
        for name, p in self.denoiser.named_parameters():
            if f".{ADAPTER_NAME}." in name:
                p.requires_grad_(False)
        self._restore_requires_grad()

    def _add_eta_adapters(self) -> None:
        """A LoRA η (the pipeline's own active adapters) enters θ_neg with weight α."""
        for layer, names in self._active.items():
            for name in names:
                if name in layer.scaling:
                    self._eta_layers.append((layer, name, float(layer.scaling[name])))
                    self._hooks.append(layer.lora_B[name].register_forward_hook(self._row_hook("eta")))

    def _row_hook(self, kind: str):
        def hook(module, inputs, output):
            rows = self._rows.get(kind)
            if rows is None:
                return None
            if output.shape[0] != rows.shape[0]:
                raise RuntimeError(
                    f"negative guidance: a LoRA layer's output has batch {output.shape[0]}, expected "
                    f"{rows.shape[0]} rows of the stacked [uncond, cond] call"
                )
            return output * rows.to(output.device, output.dtype).view(-1, *([1] * (output.ndim - 1)))

        return hook

    def _wrap_forward(self) -> None:
        self._forward = self.denoiser.__dict__.get("forward")  # an instance-level forward (offload hooks) or None
        inner = self.denoiser.forward

        def forward(*args, **kwargs):
            batch = _batch_size(args, kwargs)
            if self._all_negative or not self._guiding(batch, kwargs):
                return inner(*args, **kwargs)
            if not self.dense:  # LoRA parts only: one call, per-row factors
                with self._rowwise(batch):
                    return inner(*args, **kwargs)
            (uargs, ukwargs), (cargs, ckwargs) = _split(args, kwargs, batch)
            with self.negative_weights():
                uncond = inner(*uargs, **ukwargs)
            return _stack(uncond, inner(*cargs, **ckwargs))

        forward.__wrapped__ = inner
        self.denoiser.forward = forward
        setattr(self.denoiser, _ATTR, self)

    def _guiding(self, batch: int | None, kwargs: dict) -> bool:
        """True inside a pipeline call that stacked [uncond, cond] (CFG on, scale > 1); SD3's skip-layer call is a
        conditional-only batch and passes through."""
        try:
            cfg = bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:  # `_guidance_scale` is only set by a pipeline call
            return False
        return cfg and batch is not None and batch % 2 == 0 and kwargs.get("skip_layers") is None

    # ---- use ----------------------------------------------------------------------------------------------------
    @contextmanager
    def _rowwise(self, batch: int):
        """Inside: rows `[:batch/2]` of LoRA outputs see β (δ) and α (η), rows `[batch/2:]` see 0 (δ) and 1 (η)."""
        half = batch // 2
        self._rows = {
            "neg": torch.cat([torch.full((half,), self.beta), torch.zeros(batch - half)]),
            "eta": torch.cat([torch.full((half,), self.alpha), torch.ones(batch - half)]),
        }
        for layer, s0 in self._neg_layers:
            layer.scaling[ADAPTER_NAME] = s0
        try:
            yield
        finally:
            self._rows = {}
            for layer, _ in self._neg_layers:
                layer.scaling[ADAPTER_NAME] = 0.0

    @contextmanager
    def negative_weights(self):
        """Inside: every denoiser call computes with θ_neg on every row (LoRA scales switched, dense parameters
        swapped in), also an even batch after a guided pipeline call, which outside is read as `[uncond, cond]`."""
        params, swapped, outer = self._params, [], self._all_negative
        try:
            self._all_negative = True
            for layer, s0 in self._neg_layers:
                layer.scaling[ADAPTER_NAME] = self.beta * s0
            for layer, name, s in self._eta_layers:
                layer.scaling[name] = self.alpha * s
            for name, neg in self.dense.items():
                p = params[name]
                if neg.device != p.device or neg.dtype != p.dtype:
                    neg = self.dense[name] = neg.to(p.device, p.dtype)
                swapped.append((p, p.data))
                p.data = neg
            yield
        finally:
            self._all_negative = outer
            for p, data in swapped:
                p.data = data
            for layer, name, s in self._eta_layers:
                layer.scaling[name] = s
            for layer, _ in self._neg_layers:
                layer.scaling[ADAPTER_NAME] = 0.0

    def remove(self) -> None:
        """Restore the pipeline: `forward`, hooks, adapters (the `"negative"` adapter deleted, peft layers unloaded
        when the pipeline had none), active adapters, scales and `requires_grad` flags. A second call is a no-op."""
        if self.removed:
            return
        if self._forward is not None:
            self.denoiser.forward = self._forward
        else:
            self.denoiser.__dict__.pop("forward", None)
        self.denoiser.__dict__.pop(_ATTR, None)
        for hook in self._hooks:
            hook.remove()
        if self._neg_layers:
            if self._had_peft:
                self.denoiser.delete_adapters(ADAPTER_NAME)
                for layer, names in self._active.items():
                    layer.set_adapter(names)
            else:
                self.denoiser.unload_lora()
        self._restore_requires_grad()
        self.dense.clear()
        self.removed = True

    def _restore_requires_grad(self) -> None:
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def __repr__(self) -> str:
        state = "removed" if self.removed else "attached"
        return (
            f"NegativeAdapterHandle({state}, alpha={self.alpha}, beta={self.beta}, "
            f"lora_layers={len(self._neg_layers)}, eta_lora_layers={len(self._eta_layers)}, "
            f"dense_params={len(self.dense)})"
        )


def attach_negative_adapter(
    pipe,
    negative: str | Path | dict[str, torch.Tensor],
    *,
    beta: float = 1.0,
    alpha: float = 1.0,
    base: Any = None,
) -> NegativeAdapterHandle:
    """Make a stock diffusers pipeline run its unconditional CFG branch with θ_neg = θ_base + α·η + β·δ.

    The pipeline's own `__call__` then computes `ε = ε_neg(x, ∅ or negative prompt) + s·(ε_pos(x, c) − ε_neg(x, ∅))`
    (Diffusion-NPO, Wang et al. 2025, eq. 9). With guidance scale ≤ 1 nothing changes. Works with any scheduler (the
    pipelines apply `scale_model_input` to the stacked batch, i.e. to both branches).

    Args:
        pipe: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `StableDiffusion3Pipeline` (or any pipeline
            that stacks `[uncond, cond]` into one `unet`/`transformer` call and exposes `do_classifier_free_guidance`).
        negative (`str`, `Path` or `dict`): δ — a LoRA file or the folder holding `pytorch_lora_weights.safetensors`
            (the `final/` of `diffalign train npo|self-npo`), a dense offset (`negative_offset.safetensors`, keys =
            the denoiser's parameter names), or a state dict of either kind.
        beta (`float`, *optional*, defaults to 1.0): β, weight of δ (reference default 1).
        alpha (`float`, *optional*, defaults to 1.0): α, weight of η, the offset of the pipeline's model over the base
            (reference default 1: the negative branch keeps all of η — dropping much of it makes CFG variance explode).
        base (*optional*): θ_base, needed only when α ≠ 1 and η is dense (a fine-tuned checkpoint): a pipeline
            folder or hub id, a denoiser folder or `.safetensors` file, a pipeline, a denoiser module or a state
            dict. When the pipeline's η is a loaded LoRA (`pipe.load_lora_weights(dpo_lora)`), α scales that LoRA
            and `base` is not needed.

    Returns:
        `NegativeAdapterHandle`; `handle.remove()` restores the pipeline.

    Raises:
        ValueError: α ≠ 1 with neither `base` nor a LoRA η; a negative adapter is already attached; fused LoRA layers;
            a guidance-distilled model (FLUX.1-dev: no unconditional branch) or a pipeline that does not stack
            `[uncond, cond]` into one call (`FluxPipeline`'s true CFG).
        FileNotFoundError: `negative` does not exist.

    Example:

    ```py
    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15")
    handle = attach_negative_adapter(pipe, "runs/npo/final", beta=1.0)
    image = pipe("a photo of a cat", guidance_scale=7.5).images[0]
    handle.remove()
    ```
    """
    component = denoiser_name(pipe)
    denoiser = getattr(pipe, component)
    if getattr(denoiser.config, "guidance_embeds", False):
        raise ValueError(
            "a negative adapter replaces classifier-free guidance's unconditional branch, but this "
            f"{type(pipe).__name__} is guidance-distilled (`guidance_embeds=True`, e.g. FLUX.1-dev): it has no "
            "unconditional branch"
        )
    if not hasattr(type(pipe), "do_classifier_free_guidance"):
        raise ValueError(
            f"{type(pipe).__name__} does not stack [uncond, cond] into one denoiser call (no "
            "`do_classifier_free_guidance`), which negative adapters hook; use an SD, SDXL or SD3 pipeline"
        )
    if getattr(denoiser, _ATTR, None) is not None:
        raise ValueError("a negative adapter is already attached to this pipeline; call `handle.remove()` first")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not torch.isfinite(torch.tensor(float(value))):
            raise ValueError(f"`{name}` must be a finite number, got {value}")
    handle = NegativeAdapterHandle(pipe, alpha, beta)
    handle._check_layers()
    if alpha != 1 and base is None and not any(handle._active.values()):
        raise ValueError(
            f"`alpha` = {alpha} ≠ 1 needs `base` (θ_base, to compute η = θ_pipe − θ_base): pass the base model's "
            "pipeline folder, denoiser or state dict, or load the positive model's LoRA into the pipeline"
        )
    offset = load_negative(pipe, negative)
    base_sd = base_state_dict(base, denoiser, component) if (base is not None and alpha != 1) else None
    delta = offset.state_dict if offset.kind == "dense" else None
    handle.dense = dense_negative_weights(handle._params, handle.alpha, handle.beta, base_sd, delta)
    if alpha != 1:
        handle._add_eta_adapters()
    if offset.kind == "lora":
        handle._add_lora(offset)
    handle._wrap_forward()
    logger.info("attached %r to %s.%s", handle, type(pipe).__name__, component)
    return handle


def _lora_layers(module: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


# ---- splitting a stacked [uncond, cond] call ------------------------------------------------------------------------
def _batch_size(args: tuple, kwargs: dict) -> int | None:
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    return x.shape[0] if isinstance(x, torch.Tensor) and x.ndim > 0 else None


def _split(args: tuple, kwargs: dict, batch: int):
    """Every tensor (also inside dicts, e.g. SDXL `added_cond_kwargs`) whose first dim is the batch → its two halves;
    everything else (a 0-d timestep, attention kwargs) goes to both calls unchanged."""
    half = batch // 2

    def part(value, i):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            return value[:half] if i == 0 else value[half:]
        if isinstance(value, dict):
            return {k: part(v, i) for k, v in value.items()}
        return value

    return [(tuple(part(a, i) for a in args), {k: part(v, i) for k, v in kwargs.items()}) for i in (0, 1)]


def _stack(uncond, cond):
    """Concatenate two denoiser outputs (a tuple, or an output dataclass with `.sample`)."""
    if isinstance(uncond, tuple):
        return tuple(torch.cat([a, b]) if isinstance(a, torch.Tensor) else a for a, b in zip(uncond, cond))
    if hasattr(uncond, "sample"):
        return type(uncond)(sample=torch.cat([uncond.sample, cond.sample]))
    return torch.cat([uncond, cond])
