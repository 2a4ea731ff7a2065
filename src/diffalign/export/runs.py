"""What a training run left: its config and its weights, from a run folder, its `final/`, or a `checkpoint-N/`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffalign.config import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_LORA_FILE = "trainable.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class RunWeights:
    """A run's result. `lora` maps diffusers module paths *per component* (`{"unet": {"down_blocks.0....to_q":
    (down [r, in], up [out, r])}}`); `full_denoiser` is a `save_pretrained` folder of a full fine-tune."""

    config: dict
    source: Path
    step: int | None = None
    lora: dict[str, dict[str, tuple]] = field(default_factory=dict)
    lora_alpha: float | None = None
    lora_rank: int | None = None
    full_denoiser: Path | None = None

    @property
    def method(self) -> str:
        return self.config.get("method") or "unknown"


def load_run(run: str | Path) -> RunWeights:
    """Resolve `run` (a run folder, its `final/`, or a `checkpoint-<step>/`) and read its config and weights."""
    path = Path(run).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"`RUN` {str(path)!r} is not a folder; pass a run folder, its final/ or a checkpoint-N/"
        )
    if (path / "final").is_dir() and not _CKPT.match(path.name):
        path = path / "final"
    config = _read_config(path)
    for facts in (path / "run.json", path / "trainer_state.json"):  # the method is not a config key
        if facts.is_file():
            config.setdefault("method", json.loads(facts.read_text()).get("method"))
    weights = RunWeights(config=config, source=path)
    if _CKPT.match(path.name):
        weights.step = json.loads((path / "trainer_state.json").read_text())["step"]
        if (path / CHECKPOINT_LORA_FILE).is_file():
            _read_checkpoint_lora(path / CHECKPOINT_LORA_FILE, weights)
            return weights
        raise ConfigError(
            f"{str(path)!r} is a full fine-tune checkpoint (accelerate state); export its run's final/ instead"
        )
    if (path / LORA_FILE).is_file():
        _read_diffusers_lora(path / LORA_FILE, weights)
    elif (path / "unet").is_dir():
        weights.full_denoiser = path / "unet"
    elif (path / "transformer").is_dir():
        weights.full_denoiser = path / "transformer"
    else:
        raise ConfigError(f"{str(path)!r} holds no {LORA_FILE}, unet/ or transformer/ to export")
    return weights


def _read_config(path: Path) -> dict:
    for candidate in (path / "config.yaml", path.parent / "config.yaml", path.parent / "final" / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    raise ConfigError(
        f"no config.yaml next to {str(path)!r} (nor in its run folder): cannot tell the base model and LoRA alpha"
    )


def _read_diffusers_lora(file: Path, weights: RunWeights) -> None:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        module, kind = rest.rsplit(".lora.", 1) if ".lora." in rest else rest.rsplit(".lora_", 1)
        down = kind.startswith(("down", "A"))
        pair = weights.lora.setdefault(component, {}).setdefault(module, [None, None])
        pair[0 if down else 1] = tensor
    alpha = next((v for k, v in meta.items() if k.endswith(".lora_alpha")), None)
    weights.lora_alpha = float(alpha if alpha is not None else weights.config.get("lora_alpha") or _rank(weights))
    weights.lora_rank = _rank(weights)


def _read_checkpoint_lora(file: Path, weights: RunWeights) -> None:
    from safetensors.torch import load_file

    for key, tensor in load_file(str(file)).items():
        module, kind = key.split(".lora_", 1)  # `...to_q.lora_A.default.weight`
        pair = weights.lora.setdefault("unet", {}).setdefault(module, [None, None])
        pair[0 if kind.startswith("A") else 1] = tensor
    weights.lora_rank = _rank(weights)
    weights.lora_alpha = float(weights.config.get("lora_alpha") or weights.lora_rank)


def _rank(weights: RunWeights) -> int:
    first = next(iter(next(iter(weights.lora.values())).values()))
    return int(first[0].shape[0])
