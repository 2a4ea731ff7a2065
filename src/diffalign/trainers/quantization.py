"""A quantised frozen base for LoRA training (`base_quantization: none|int8|fp8|nf4`), through torchao.

In a LoRA run the denoiser's base weights never train, and the same frozen network (adapters disabled) is the
reference. `quantize_base` stores the weights of its `nn.Linear` layers (attention and feed-forward projections: most
of the parameters of a UNet or DiT) in fewer bits; every forward dequantises them to the activation dtype, so the
matmuls run in the compute precision (weight-only quantisation: it saves memory, not time):

- `int8`: int8 per output channel, absmax scale (torchao `Int8WeightOnlyConfig`): 1 byte/weight + one scale per row.
- `fp8`: float8 e4m3 per output row (torchao `Float8WeightOnlyConfig`): 1 byte/weight + one scale per row. A weight
  format, not fp8 matmuls: it runs wherever torch has float8 dtypes (CPU, any CUDA GPU).
- `nf4`: 4-bit NormalFloat in blocks of 64 with double-quantised block scales (QLoRA, Dettmers et al. 2023, §3;
  torchao `NF4Tensor`, the tensor torchtune's QLoRA uses): 0.5 byte/weight + 1/64 byte (8-bit block scale) +
  4/(64·s) bytes (one fp32 per `s` ≤ 256 block scales). A layer whose weight count is not a multiple of 64 stays in
  the compute dtype.

Convolutions, norms, embeddings and biases stay in the compute dtype; the LoRA weights (`lora_A`/`lora_B`) and the
optimizer stay fp32, and `save_lora` writes only them, so the file loads on the unquantised base with stock diffusers.
Why torchao: one maintained library covers int8, fp8 and nf4, with input gradients (needed by LoRA layers upstream of
a quantised one), on CPU (tested here) and CUDA; bitsandbytes and optimum-quanto also ran here, but each adds a second
code path for what torchao already does.
"""

from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

from diffalign.optional import MissingDependencyError, require

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "fp8", "nf4")
DEVICE_TYPES = ("cpu", "cuda")  # CPU: tested here; CUDA: torchao's main target, not yet run by this project
NF4_BLOCK = 64  # QLoRA's block size
TORCHAO_API = {"int8": "Int8WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig", "nf4": "to_nf4"}
TORCHAO_MODULES = ("torchao.quantization", "torchao.dtypes")  # `to_nf4` moved from dtypes to quantization in 0.18


def resolve_base_quantization(requested: str, device_type: str, sharded: bool = False) -> str:
    """Check that `requested` can run on `device_type` (and, `sharded`, under FSDP/ZeRO) and return it. A full
    fine-tune with a quantised base is refused where the config is read (`TrainConfig`).

    Raises:
        `ConfigError`: an unknown value, a sharded engine (FSDP/ZeRO over torchao tensors is untested), a device
            other than CPU or CUDA, or fp8 where torch has no float8 dtype.
        `MissingDependencyError`: torchao is not installed, or is too old to have the API `requested` needs; the
            message names `pip install 'diffalign[quant]'`.
    """
    from diffalign.config import ConfigError

    if requested not in QUANTIZATIONS:
        raise ConfigError(f"`base_quantization` must be one of {list(QUANTIZATIONS)}, got {requested!r}")
    if requested == "none":
        return requested
    if sharded:
        raise ConfigError(
            f"`base_quantization: {requested}` is not supported under FSDP/DeepSpeed (untested with sharded torchao "
            "weights); a quantised LoRA base fits one device: launch with DDP or one process"
        )
    if device_type not in DEVICE_TYPES:
        raise ConfigError(
            f"`base_quantization: {requested}` runs on {' or '.join(DEVICE_TYPES)}, not on {device_type!r}; "
            "use `base_quantization: none`"
        )
    if requested == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ConfigError(
            f"`base_quantization: fp8` needs torch with float8 dtypes (torch {torch.__version__} has none)"
        )
    torchao = require("torchao", f"`base_quantization: {requested}`")
    name = TORCHAO_API[requested]
    if torchao_api(name) is None:
        raise MissingDependencyError(
            f"`base_quantization: {requested}` needs `torchao.quantization.{name}`, which torchao "
            f"{getattr(torchao, '__version__', '?')} lacks: pip install -U 'diffalign[quant]'"
        )
    return requested


def quantizable_linears(denoiser: nn.Module) -> dict[str, nn.Linear]:
    """The denoiser's `nn.Linear` layers outside the LoRA adapters (peft's `lora_A`/`lora_B` are `nn.Linear` too)."""
    return {
        name: module
        for name, module in denoiser.named_modules()
        if isinstance(module, nn.Linear) and not any(part.startswith("lora_") for part in name.split("."))
    }


@torch.no_grad()
def quantize_base(denoiser: nn.Module, kind: str) -> dict[str, int]:
    """Quantise the frozen `nn.Linear` weights of `denoiser` in place (after the LoRA adapter was added) and return
    counts: `quantized`/`skipped` layers, `bytes_before`/`bytes_after` of their weights."""
    if kind == "none":
        return {"quantized": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0}
    linears = quantizable_linears(denoiser)
    before = sum(_nbytes(m.weight) for m in linears.values())
    skipped = 0
    if kind == "nf4":
        skipped = _to_nf4(linears)
    else:
        from torchao.quantization import quantize_

        config = torchao_api(TORCHAO_API[kind])()
        ids = {id(m) for m in linears.values()}
        quantize_(denoiser, config, filter_fn=lambda module, fqn: id(module) in ids)
    quantized = [name for name, module in linears.items() if type(module.weight.data) is not torch.Tensor]
    for name in quantized:
        linears[name].register_forward_pre_hook(_cast_input)
    # DDP broadcasts every parameter at start; torchao tensors cannot be broadcast, and need not be: each process
    # quantises the same weights from disk the same way
    ignored = [f"{name}.weight" for name in quantized]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(denoiser, ignored)
    after = sum(_nbytes(m.weight) for m in linears.values())
    stats = {"quantized": len(linears) - skipped, "skipped": skipped, "bytes_before": before, "bytes_after": after}
    logger.info(
        "base_quantization %s: %d linear layers quantised (%d kept in %s), their weights %.1f MB → %.1f MB",
        kind,
        stats["quantized"],
        skipped,
        next(iter(linears.values())).weight.dtype if linears else "-",
        before / 1e6,
        after / 1e6,
    )
    return stats


def _to_nf4(linears: dict[str, nn.Linear]) -> int:
    """Swap each weight for an `NF4Tensor` (frozen); returns how many layers were left as they were."""
    to_nf4 = torchao_api("to_nf4")
    skipped = 0
    for module in linears.values():
        n = module.weight.numel()
        if n % NF4_BLOCK:
            skipped += 1
            continue
        scaler_block = _largest_power_of_two_dividing(n // NF4_BLOCK, 256)
        weight = to_nf4(module.weight.detach().contiguous(), NF4_BLOCK, scaler_block)
        module.weight = nn.Parameter(weight, requires_grad=False)
    return skipped


def _cast_input(module: nn.Linear, args: tuple) -> tuple:
    """Feed a quantised layer activations in its weights' dtype, as autocast does for a plain one (autocast does not
    see torchao's tensor subclasses: an fp32 input would otherwise give an fp32 output inside a bf16 network)."""
    x, *rest = args
    return (x.to(module.weight.dtype), *rest) if x.is_floating_point() else args


def torchao_api(name: str):
    """`name` from the first of `TORCHAO_MODULES` that has it, or None."""
    for module in TORCHAO_MODULES:
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    return None


def _largest_power_of_two_dividing(n: int, cap: int) -> int:
    p = cap
    while n % p:
        p //= 2
    return p


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantised torchao) tensor holds: the sum over its inner tensors."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None:
        return t.numel() * t.element_size()
    names, _ = inner()
    return sum(_nbytes(getattr(t, n)) for n in names)
