"""Preemption: SIGTERM (what SLURM and spot instances send before the kill) and SIGINT (Ctrl-C) finish the current
optimizer step, save `checkpoint-<step>/` and stop with `Preempted` (the CLI exits 128 + signal: 143 / 130), so
`--resume latest` continues bit-exactly. Every rank checks a shared flag after each step (one all-reduce of a scalar),
so all processes stop after the same step even when only one of them got the signal."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint; `signum` is the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopFlag:
    """Set by the signal handlers; `agreed(accelerator)` is the maximum over processes (0 = keep going)."""

    def __init__(self) -> None:
        self.signum = 0

    def agreed(self, accelerator) -> int:
        if accelerator.num_processes == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([float(self.signum)], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # SIGTERM (15) wins over SIGINT (2)
        return int(flag.item())


@contextmanager
def stop_on_signals():
    """Inside, SIGTERM/SIGINT only set the returned flag (the step in flight completes); handlers restored after."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set in the main thread
        yield flag
        return

    def handler(signum, frame):
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
