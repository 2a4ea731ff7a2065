"""`diffalign env`: what this machine offers diffalign — versions, devices, attention kernels, precisions."""

from __future__ import annotations

import importlib.util
import os
import platform
from importlib import metadata

PACKAGES = (
    *("diffalign", "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "datasets"),
    *("safetensors", "huggingface_hub", "open_clip_torch", "xformers", "bitsandbytes", "deepspeed", "tensorboard"),
    "wandb",
)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, object]:
    """A JSON-able report: package versions, devices, attention kernels and mixed-precision support."""
    import torch

    report: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "hub_offline": os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"),
        "cpu_threads": torch.get_num_threads(),
    }
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1)})  # fmt: skip
    report["cuda_devices"] = devices
    report["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    cuda = bool(devices)
    report["attention"] = {
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "sdpa_flash": cuda and torch.backends.cuda.flash_sdp_enabled(),
        "sdpa_mem_efficient": cuda and torch.backends.cuda.mem_efficient_sdp_enabled(),
        "xformers": importlib.util.find_spec("xformers") is not None and cuda,
    }
    report["mixed_precision"] = {
        "fp16": cuda,
        "bf16": (cuda and torch.cuda.is_bf16_supported()) or not cuda,  # CPU autocast supports bf16
        "note": "on CPU, fp16 falls back to fp32 and bf16 runs through CPU autocast" if not cuda else "",
    }
    report["accelerate_config"] = _accelerate_config()
    return report


def _accelerate_config() -> str | None:
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return None
    return default_config_file if os.path.isfile(default_config_file) else None


def format_environment(report: dict[str, object]) -> str:
    lines = [f"python {report['python']} on {report['platform']}"]
    lines += [f"{name}: {version}" for name, version in report["packages"].items()]
    devices = report["cuda_devices"] or []
    lines.append("devices: " + (", ".join(f"cuda:{d['index']} {d['name']} (sm {d['capability']}, "
                                          f"{d['memory_gib']} GiB)" for d in devices) or "CPU only"))  # fmt: skip
    lines.append("attention: " + ", ".join(k for k, v in report["attention"].items() if v))
    mp = report["mixed_precision"]
    lines.append(f"mixed precision: fp16 {'yes' if mp['fp16'] else 'no'}, bf16 {'yes' if mp['bf16'] else 'no'}"
                 + (f" ({mp['note']})" if mp["note"] else ""))  # fmt: skip
    lines.append(f"accelerate config: {report['accelerate_config'] or 'none (defaults)'}")
    lines.append(f"hub offline: {report['hub_offline']}")
    return "\n".join(lines)
