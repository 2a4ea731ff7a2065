"""Find the weights of a training run: `OUT/`, `OUT/final/` or `OUT/checkpoint-N/`, with the config that made them.

A LoRA is read into one representation whatever file it came from: `{module: (down, up)}` with `module` the diffusers
module path including its component (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), `down` = A
`[r, in]`, `up` = B `[out, r]`, and one `lora_alpha`, so that the weight update is ΔW = (α / r) · B A (Hu et al. 2021,
LoRA, eq. 3 with peft's scaling α / r).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from diffalign.config import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# (down, up) suffixes: peft/diffusers-new, peft inside a model (checkpoints), old diffusers
_LORA_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)


@dataclass
class RunWeights:
    """What one run folder holds, ready for any export format.

    Attributes:
        source (`Path`): the folder the weights came from (`final/` or `checkpoint-N/`).
        run_dir (`Path`): the run's output folder.
        config (`dict`): the resolved training config (`model` = base pipeline folder, `lora_rank`, `beta`, ...).
        family (`str`): `"sd"`, `"sdxl"`, `"sd3"` or `"flux"` (from the base pipeline's `model_index.json`).
        method (`str | None`): `dpo`, `npo`, ... when it can be known.
        step (`int | None`): optimizer steps behind these weights.
        lora (`dict[str, tuple[Tensor, Tensor]] | None`): `{module: (down, up)}` for LoRA runs.
        lora_alpha (`float | None`): α of the LoRA (scale α / r).
        denoiser_state (`dict[str, Tensor] | None`): full fine-tunes: the denoiser's diffusers state dict.
    """

    source: Path
    run_dir: Path
    config: dict
    family: str
    method: str | None = None
    step: int | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    lora_alpha: float | None = None
    denoiser_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return str(self.config["model"])

    @property
    def lora_rank(self) -> int | None:
        return next(iter(self.lora.values()))[0].shape[0] if self.lora else None

    @property
    def is_negative(self) -> bool:
        """NPO / Self-NPO runs produce a negative adapter δ meant for the CFG unconditional branch only."""
        return self.method in ("npo", "self-npo")


def resolve_source(path: str | Path) -> Path:
    """`OUT` → `OUT/final`; `OUT/final` and `OUT/checkpoint-N` as they are.

    Raises:
        FileNotFoundError: `path` holds neither `final/` nor weights.
    """
    path = Path(path)
    if (path / "final").is_dir() and not _has_weights(path):
        path = path / "final"
    if not path.is_dir() or not _has_weights(path):
        raise FileNotFoundError(
            f"`RUN` '{path}' holds no trained weights ({LORA_FILE}, unet/, transformer/, trainable.safetensors or "
            "model.safetensors); pass a run folder (with final/), its final/ or a checkpoint-<step>/ folder"
        )
    return path


def _has_weights(path: Path) -> bool:
    names = (LORA_FILE, "unet", "transformer", "trainable.safetensors", "model.safetensors")
    return any((path / n).exists() for n in names)


def load_run(path: str | Path, config: str | Path | None = None, method: str | None = None) -> RunWeights:
    """Read a run's weights and config.

    Args:
        path (`str` or `Path`): a run folder, its `final/`, or a `checkpoint-<step>/` folder.
        config (`str` or `Path`, *optional*): the training YAML, for a checkpoint of a run that has no `final/` yet.
        method (`str`, *optional*): the method's CLI name, when the files cannot tell (DPO and NPO share keys).
    """
    from diffalign.backbones import detect_family

    source = resolve_source(path)
    is_checkpoint = _CHECKPOINT.match(source.name) is not None
    run_dir = source.parent
    cfg = _read_config(source, run_dir, config)
    family = detect_family(cfg["model"])
    state = json.loads((source / STATE_FILE).read_text()) if (source / STATE_FILE).is_file() else {}
    run = RunWeights(source, run_dir, cfg, family, method or _method(cfg, run_dir, state), _step(run_dir, state))
    if (source / LORA_FILE).is_file():
        run.lora, run.lora_alpha = read_lora_file(source / LORA_FILE)
        run.lora_alpha = run.lora_alpha or cfg.get("lora_alpha") or run.lora_rank
    elif (source / "trainable.safetensors").is_file():
        run.lora = _read_peft(source / "trainable.safetensors", "unet" if family in ("sd", "sdxl") else "transformer")
        run.lora_alpha = float(cfg.get("lora_alpha") or run.lora_rank)
    elif is_checkpoint:
        from safetensors.torch import load_file

        run.denoiser_state = load_file(str(source / "model.safetensors"))
    else:
        run.denoiser_state = _read_denoiser(source)
    return run


def _read_config(source: Path, run_dir: Path, config: str | Path | None) -> dict:
    candidates = [Path(config)] if config else [source / CONFIG_FILE, run_dir / "final" / CONFIG_FILE]
    candidates += [run_dir / CONFIG_FILE]
    for candidate in candidates:
        if candidate.is_file():
            cfg = yaml.safe_load(candidate.read_text()) or {}
            if "model" not in cfg:
                raise ConfigError(f"run config '{candidate}' has no `model` key; pass the training YAML with --config")
            return cfg
    raise ConfigError(
        f"cannot tell the base model of '{source}': none of {[str(c) for c in candidates]} exists; pass the "
        "training YAML with `--config` (it names `model`, `lora_rank`, `lora_alpha`)"
    )


def _method(cfg: dict, run_dir: Path, state: dict) -> str | None:
    """The method from the config (`method`), a checkpoint's trainer state, or the config's unique key set."""
    if cfg.get("method") or state.get("method"):
        return cfg.get("method") or state["method"]
    run_facts = run_dir / "final" / "run.json"  # written by every finished run
    if run_facts.is_file():
        return json.loads(run_facts.read_text()).get("method")
    for ckpt in sorted(run_dir.glob("checkpoint-*/" + STATE_FILE)):
        return json.loads(ckpt.read_text()).get("method")
    import importlib

    from diffalign.trainers import METHODS

    keys = set(cfg)
    found = []
    for name, (module, _, config_class, _) in METHODS.items():
        cls = getattr(importlib.import_module(f"diffalign.trainers.{module}"), config_class)
        if set(cls.model_fields) == keys:
            found.append(name)
    return found[0] if len(found) == 1 else None


def _step(run_dir: Path, state: dict) -> int | None:
    """Steps behind the weights: the checkpoint's state, else the last line of metrics.jsonl, else the newest
    checkpoint."""
    if "step" in state:
        return int(state["step"])
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text().strip().splitlines()
        if lines:
            return int(json.loads(lines[-1])["step"])
    steps = [int(m.group(1)) for p in run_dir.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return max(steps) if steps else None


def read_lora_file(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float | None]:
    """A diffusers-format LoRA file → `({module: (down, up)}, lora_alpha or None)`; α comes from the
    `lora_adapter_metadata` diffusers writes (the peft `LoraConfig` of each component)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    alpha = None
    if "lora_adapter_metadata" in metadata:
        meta = json.loads(metadata["lora_adapter_metadata"])
        alphas = {v for k, v in meta.items() if k.endswith(".lora_alpha")}
        patterns = [k for k, v in meta.items() if k.endswith(("alpha_pattern", "rank_pattern")) and v]
        if patterns:
            raise ConfigError(f"LoRA '{path}' uses per-module ranks/alphas ({patterns}); only one α is supported")
        alpha = float(alphas.pop()) if len(alphas) == 1 else None
    return _pairs(state, path), alpha


def _read_peft(path: Path, component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    return {f"{component}.{k}": v for k, v in _pairs(load_file(str(path)), path).items()}


def _pairs(state: dict[str, torch.Tensor], path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for key, value in state.items():
        for down, up in _LORA_SUFFIXES:
            if key.endswith(down):
                module = key[: -len(down)]
                out[module] = (value, state[module + up])
                break
    if not out:
        raise ConfigError(f"LoRA file '{path}' has no lora_A/lora_B (or lora.down/lora.up) weights")
    return out


def _read_denoiser(source: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for sub in ("unet", "transformer"):
        files = sorted((source / sub).glob("*.safetensors"))
        if files:
            state = {}
            for file in files:
                state.update(load_file(str(file)))
            return state
    raise FileNotFoundError(f"'{source}' has no unet/ or transformer/ weights (*.safetensors)")
