"""What the loop needs to behave the same on 1 or N processes: batch statistics reduced over processes, a guard
against a mis-launched run, a lock so two runs never share an `output_dir`, and a description of the launch."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LOCK_FILE = ".diffalign.lock"


class LaunchError(RuntimeError):
    """The run was launched in a way that would silently train wrong (a user error: exit code 2)."""


def global_mean(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (any shape, detached) over every process: `Σ values / Σ count`, exact for unequal sizes."""
    values = values.detach().float().reshape(-1)
    local = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
    total = accelerator.reduce(local, reduction="sum")
    return total[0] / total[1]


def check_world_size(accelerator) -> None:
    """`WORLD_SIZE` > 1 in the environment but accelerate sees one process: every rank would train the whole run
    alone and write the same files. Refuse with the launch line to use."""
    env = int(os.environ.get("WORLD_SIZE", "1"))
    if env > 1 and accelerator.num_processes == 1:
        cpu_hint = "" if torch.cuda.is_available() else " (no GPU here: set ACCELERATE_USE_CPU=1 for CPU processes)"
        raise LaunchError(
            f"WORLD_SIZE={env} in the environment but accelerate sees 1 process{cpu_hint}: launch with "
            f"`accelerate launch --num_processes {env} -m diffalign train ...` or `torchrun --nproc_per_node {env} "
            "-m diffalign train ...`, or unset WORLD_SIZE for a single-process run"
        )


# accelerate launch exports these for the engine chosen in the accelerate config (or --use_fsdp / --use_deepspeed)
ENGINE_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}


def engine_name(distributed_type) -> str:
    """`DistributedType.MULTI_GPU` → `"MULTI_GPU"` (the enum or its string)."""
    return str(getattr(distributed_type, "value", distributed_type)).upper()


def requested_engine(environ: dict[str, str] | None = None) -> str | None:
    """`"FSDP"` or `"DEEPSPEED"` when `accelerate launch` was asked for that engine, else None."""
    env = os.environ if environ is None else environ
    for name, var in ENGINE_ENV.items():
        if env.get(var, "false").lower() in ("1", "true", "yes"):
            return name
    return None


def check_engine(distributed_type: str, lora: bool, environ: dict[str, str] | None = None) -> None:
    """Refuse to run as plain DDP when the launch asked for FSDP or DeepSpeed (accelerate falls back silently, e.g.
    on CPU processes), and refuse LoRA under a sharding engine (the LoRA checkpoints read unsharded parameters; LoRA
    fits one GPU: use DDP)."""
    wanted = requested_engine(environ)
    if wanted is not None and wanted not in distributed_type:
        raise LaunchError(
            f"the accelerate launch asked for {wanted} (`{ENGINE_ENV[wanted]}`) but the Accelerator runs "
            f"{distributed_type}; FSDP and DeepSpeed need GPUs (and `pip install deepspeed` for DeepSpeed)"
        )
    if lora and distributed_type in ("FSDP", "DEEPSPEED"):
        raise LaunchError(
            f"LoRA runs do not shard: launch with configs/accelerate/multi_gpu.yaml (DDP), not {distributed_type}"
        )


def describe_launch(accelerator, batch_size: int, accumulation: int) -> str:
    """One startup line: distributed type, world size, per-device batch, accumulation and global batch."""
    n = accelerator.num_processes
    kind = str(accelerator.distributed_type).split(".")[-1]
    return (
        f"launch: {kind} | {n} process(es) on {accelerator.device.type} | per-device batch {batch_size} x "
        f"accumulation {accumulation} x {n} processes = global batch {batch_size * accumulation * n}"
    )


class OutputDirLock:
    """`output_dir/.diffalign.lock` holds the owner's pid and host while a run writes there. A second run is refused
    with the owner named; a lock whose pid is gone on this host is stale and taken over (logged). Only the main
    process takes it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._stale(owner):
                    raise LaunchError(
                        f"`output_dir` {str(self.path.parent)!r} is in use by another run (pid {owner.get('pid')} on "
                        f"host {owner.get('host')}); use another `output_dir`, or wait for it to finish "
                        f"(delete {self.path} only if that run is gone)"
                    ) from None
                logger.warning("taking over a stale lock %s (owner %s is gone)", self.path, owner)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise LaunchError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable/half-written: treated as stale

    @staticmethod
    def _stale(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process cannot be checked from here
        pid = int(owner.get("pid", -1))
        if pid == os.getpid():
            return True  # our own leftover (an earlier run in this process that died)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
