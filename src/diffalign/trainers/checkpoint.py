"""Checkpoint folders: `checkpoint-<step>/`, written atomically, found by `latest`, pruned to a limit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
HASHED_BELOW = 256 * 2**20  # files smaller than this (RNG states, scheduler, LoRA weights) are hashed; all are sized


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a trainer state file), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`None` → no resume; `latest` → the newest complete `checkpoint-<step>` in `output_dir` (None if there is
    none yet); a path → that folder, which must be a complete checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"`resume` {resume!r} is not a complete checkpoint folder (no {STATE_FILE}); use `latest` or a "
            f"checkpoint-<step> folder from {output_dir}"
        )
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def check_layout(state: dict, now: dict, path: Path) -> None:
    """A checkpoint resumes the exact sample stream only with the same global micro-batch (per-device batch ×
    processes) and accumulation; the number of processes may change when their product stays the same."""
    from diffalign.config import ConfigError

    for key in ("method", "model", "lora_rank", "lora_alpha", "lora_target_modules"):
        if key in state and key in now and state[key] != now[key]:
            raise ConfigError(
                f"cannot resume {str(path)!r}: it was trained with {key} {state[key]!r}, this run has "
                f"{now[key]!r}; resume with the same {key}, or start a new run from its weights with "
                f"`--init_from {path}` and a new `output_dir`"
            )
    if "world_size" not in state:  # written before the layout was recorded
        return
    then_batch = state["batch_size"] * state["world_size"]
    now_batch = now["batch_size"] * now["world_size"]
    if then_batch != now_batch or state["gradient_accumulation_steps"] != now["gradient_accumulation_steps"]:
        raise ConfigError(
            f"cannot resume {str(path)!r}: it was trained with {state['batch_size']} per device x "
            f"{state['world_size']} processes x {state['gradient_accumulation_steps']} accumulation, now "
            f"{now['batch_size']} x {now['world_size']} x {now['gradient_accumulation_steps']}; keep per-device "
            "batch x processes and `gradient_accumulation_steps` the same (e.g. double `batch_size` when halving "
            "the processes)"
        )


def finalize(tmp_dir: Path, final_dir: Path, state: dict) -> Path:
    """Write the manifest, then the state file last, and rename `tmp_dir` into place, so a crash mid-save never
    leaves a checkpoint that `latest` would pick."""
    (tmp_dir / MANIFEST_FILE).write_text(json.dumps(manifest(tmp_dir), indent=1))
    (tmp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)
    return final_dir


def remove_orphans(output_dir: str | Path) -> list[Path]:
    """Delete `.tmp-checkpoint-*` folders left by a save that was killed mid-way (never picked by `latest`)."""
    root = Path(output_dir)
    orphans = sorted(root.glob(".tmp-checkpoint-*")) if root.is_dir() else []
    for path in orphans:
        shutil.rmtree(path, ignore_errors=True)
    return orphans


def prune(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was deleted."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    removed = found[:-keep] if len(found) > keep else []
    for path in removed:
        shutil.rmtree(path)
    return removed


def load_initial_weights(denoiser, source: str | Path, lora_rank: int, lora_alpha: float | None) -> str:
    """Copy the trained weights of another run (`init_from`: a run folder, its `final/` or a `checkpoint-<step>/`)
    into `denoiser`: LoRA factors into the matching adapter (same rank and α, or one line saying which differs),
    a full fine-tune's state dict into the denoiser (strict). Returns a description for the log."""
    import torch

    from diffalign.backbones.base import unwrap
    from diffalign.config import ConfigError
    from diffalign.export.runs import load_run

    try:
        run = load_run(source)
    except FileNotFoundError as err:
        raise ConfigError(f"`init_from`: {err}") from None
    net = unwrap(denoiser)
    what = f"{run.method or 'a'} run at step {run.step} ({run.source})"
    if run.lora is not None:
        alpha = lora_alpha or lora_rank
        if lora_rank != run.lora_rank or float(alpha) != float(run.lora_alpha):
            raise ConfigError(
                f"`init_from` {str(source)!r} holds a LoRA of rank {run.lora_rank}, alpha {run.lora_alpha:g}; this "
                f"run has lora_rank {lora_rank}, lora_alpha {alpha:g}; use the same `lora_rank` and `lora_alpha`"
            )
        params = dict(net.named_parameters())
        with torch.no_grad():
            for module, (down, up) in run.lora.items():
                name = module.split(".", 1)[1]  # drop the component (`unet.`)
                for factor, value in (("lora_A", down), ("lora_B", up)):
                    key = f"{name}.{factor}.default.weight"
                    if key not in params:
                        raise ConfigError(
                            f"`init_from` {str(source)!r}: LoRA module {module!r} is not adapted in this run; use the "
                            "same `lora_target_modules` and `model`"
                        )
                    params[key].copy_(value)
        return f"LoRA of the {what}"
    if lora_rank:
        raise ConfigError(
            f"`init_from` {str(source)!r} is a full fine-tune; this run trains a LoRA (`lora_rank` {lora_rank}); "
            "pass its final/ folder as `model` instead, or set `lora_rank: 0`"
        )
    missing, unexpected = net.load_state_dict(run.denoiser_state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"`init_from` {str(source)!r} does not fit this model: {len(missing)} weights missing (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); use the same `model`"
        )
    return f"weights of the {what}"


def manifest(folder: Path) -> dict[str, dict]:
    """`{relative path: {"bytes": n, "sha256": hex}}` of every file in `folder` (sha256 only below
    `HASHED_BELOW`: hashing a 30 GB sharded SDXL checkpoint on every save would cost minutes)."""
    import hashlib

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in (MANIFEST_FILE, STATE_FILE):
            continue
        entry = {"bytes": path.stat().st_size}
        if entry["bytes"] < HASHED_BELOW:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        files[name] = entry
    return files


def verify(path: Path) -> None:
    """Refuse to resume from a damaged checkpoint (a file missing, truncated or altered since it was saved) with one
    line naming the file — accelerate would otherwise skip an unreadable RNG-state file with an info message.
    Checkpoints written before manifests existed are accepted as they are."""
    from diffalign.config import ConfigError

    recorded_file = path / MANIFEST_FILE
    if not recorded_file.is_file():
        return
    recorded, now = json.loads(recorded_file.read_text()), manifest(path)
    for name, entry in recorded.items():
        found = now.get(name)
        problem = (
            "is missing"
            if found is None
            else f"has {found['bytes']} bytes, {entry['bytes']} were saved"
            if found["bytes"] != entry["bytes"]
            else "changed since it was saved (sha256 differs)"
            if found.get("sha256") != entry.get("sha256")
            else None
        )
        if problem:
            earlier = [p for p in list_checkpoints(path.parent) if p != path]
            hint = f"resume from an earlier checkpoint ({earlier[-1]})" if earlier else "start a new run"
            raise ConfigError(f"checkpoint {str(path)!r} is damaged: {name} {problem}; {hint}")
