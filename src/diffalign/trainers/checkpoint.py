"""Checkpoint folders: `checkpoint-<step>/`, written atomically, found by `latest`, pruned to a limit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


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
                f"{now[key]!r}; resume with the same {key}, or start a new `output_dir`"
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
    """Write the state file last and rename `tmp_dir` into place, so a crash mid-save never leaves a checkpoint
    that `latest` would pick."""
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
