"""Soak test for issue #16 (not CI): many short training runs hit by random faults must end with the same weights
as runs that were never interrupted.

Each trial writes a small Pick-a-Pic-style table on the toy world (a random number of undecodable rows), trains an
uninterrupted DPO LoRA run on the shipped toy model, then trains the same config again under a storm of faults,
restarting with `--resume latest` after each one until the run finishes:

- SIGKILL at a random moment (no chance to save: the run continues from its last checkpoint; a half-written
  `.tmp-checkpoint-*` and the dead run's lock must be cleaned up at the next start),
- SIGTERM / SIGINT at a random moment (the step completes, a checkpoint is saved, exit 143 / 130),
- a disk that fills up while a checkpoint is written (half the files land, then ENOSPC; exit 1, previous checkpoint
  intact).

The final LoRA weights of every stormy run must equal the uninterrupted run's, byte for byte; any difference is
"bytes lost". Prints one line per trial and a summary table (the README's reliability numbers come from it):

    python scripts/soak.py --trials 10 --seed 0
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FAULTS = ("sigkill", "sigterm", "sigint", "disk_full")
# a signal that lands before training starts (imports, model loading) ends the process the default way: nothing is lost
EXPECTED_EXIT = {"sigterm": {143, -signal.SIGTERM}, "sigint": {130, -signal.SIGINT}, "disk_full": {1},
                 "sigkill": {-signal.SIGKILL}}  # fmt: skip


def write_table(path: Path, rows: int, bad_rows: int, rng: random.Random) -> list[int]:
    """A pairs table on the toy world's colours; `bad_rows` random rows get an undecodable winner image."""
    import pandas as pd
    from PIL import Image

    def png(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
        return buf.getvalue()

    bad = sorted(rng.sample(range(rows), bad_rows))
    records = []
    for i in range(rows):
        a = tuple(rng.randrange(256) for _ in range(3))
        b = tuple(rng.randrange(256) for _ in range(3))
        records.append({"caption": f"a square number {i}", "jpg_0": b"truncated" if i in bad else png(a),
                        "jpg_1": png(b), "label_0": 1, "label_1": 0})  # fmt: skip
    pd.DataFrame(records).to_parquet(path)
    return bad


def train_command(data: Path, out: Path, steps: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "diffalign", "train", "dpo", "--model", "toy", "--data", str(data),
           "--output_dir", str(out), "--resolution", "32", "--batch_size", "1", "--lora_rank", "4",
           "--learning_rate", "1e-3", "--max_steps", str(steps), "--checkpointing_steps", "2",
           "--checkpoints_total_limit", "2"]  # fmt: skip
    return cmd + (["--resume", "latest"] if resume else [])


def stormy_run(data: Path, out: Path, steps: int, rng: random.Random, max_faults: int) -> Counter:
    """Train to the end, injecting up to `max_faults` random faults; returns what was injected and survived."""
    survived: Counter = Counter()
    for attempt in range(max_faults + 1):
        fault = rng.choice(FAULTS) if attempt < max_faults else None
        cmd = train_command(data, out, steps, resume=attempt > 0)
        if fault == "disk_full":  # the 1st, 2nd or 3rd checkpoint this attempt writes fails
            cmd = [sys.executable, __file__, "fill-disk-at", str(rng.randint(0, 2)), "--", *cmd[3:]]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if fault in ("sigkill", "sigterm", "sigint"):
            _signal_at_random_moment(proc, out, rng, fault)
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode == 0:
            return survived  # finished (a disk-full trigger that was never reached, or a kill after the end)
        if fault is None or proc.returncode not in EXPECTED_EXIT[fault]:
            raise RuntimeError(f"{out}: fault {fault} gave exit {proc.returncode}:\n{stderr[-3000:]}")
        survived[fault] += 1
    raise AssertionError("unreachable: the last attempt has no fault")


def _signal_at_random_moment(proc: subprocess.Popen, out: Path, rng: random.Random, fault: str) -> None:
    """Wait until the run has logged a random number of steps (0-6 new ones), then send the signal."""
    metrics = out / "metrics.jsonl"
    start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    target = start + rng.randint(0, 6)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if done >= target:
            time.sleep(rng.random() * 0.2)  # anywhere inside the next step, or inside a save
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal({"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[fault])


def fill_disk_at(nth_save: int, argv: list[str]) -> None:
    """Worker: run the CLI with the `nth_save`-th checkpoint save failing half-way with ENOSPC."""
    from accelerate import Accelerator

    original = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth_save + 1:
            original(self, output_dir, **kwargs)  # the files land, then the disk is full before the rename
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    Accelerator.save_state = save_state
    sys.argv = ["diffalign", *argv]
    from diffalign.cli import main

    main()


def final_weights(out: Path) -> tuple[dict, dict]:
    """The final LoRA file's tensors and metadata. (Raw file bytes are not comparable: safetensors writes its
    metadata map in a per-process random order.)"""
    from safetensors import safe_open

    with safe_open(str(out / "final" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def bytes_lost(a: tuple[dict, dict], b: tuple[dict, dict]) -> int:
    """Bytes of tensor data that differ between two weight files (a missing tensor counts whole), plus 1 if the
    metadata differ."""
    (ta, ma), (tb, mb) = a, b
    lost = int(ma != mb)
    for key in ta.keys() | tb.keys():
        if key not in ta or key not in tb:
            lost += (ta.get(key) if key in ta else tb[key]).numel() * 4
            continue
        x, y = ta[key].contiguous().view(-1).view(torch.uint8), tb[key].contiguous().view(-1).view(torch.uint8)
        lost += int((x != y).sum()) if x.shape == y.shape else max(x.numel(), y.numel())
    return lost


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "fill-disk-at":
        fill_disk_at(int(sys.argv[2]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--faults", type=int, default=5, help="faults injected per stormy run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="diffalign-soak-"))
    totals: Counter = Counter()
    lost = 0
    started = time.perf_counter()
    for trial in range(args.trials):
        folder = root / f"trial{trial}"
        folder.mkdir()
        bad = write_table(folder / "pairs.parquet", rows=8, bad_rows=rng.randint(0, 3), rng=rng)
        clean = subprocess.run(train_command(folder / "pairs.parquet", folder / "clean", args.steps, False), env=ENV,
                               capture_output=True, text=True)  # fmt: skip
        if clean.returncode != 0:
            raise RuntimeError(f"uninterrupted run failed:\n{clean.stderr[-3000:]}")
        survived = stormy_run(folder / "pairs.parquet", folder / "stormy", args.steps, rng, args.faults)
        diff = bytes_lost(final_weights(folder / "clean"), final_weights(folder / "stormy"))
        lost += diff
        totals.update(survived)
        totals["bad_rows"] += len(bad)
        state = json.loads((folder / "stormy" / "metrics.jsonl").read_text().splitlines()[-1])
        print(f"trial {trial}: bad rows {bad}, faults survived {dict(survived)}, skipped samples "
              f"{state['skipped_samples']}, bytes lost {diff}", flush=True)  # fmt: skip
    minutes = (time.perf_counter() - started) / 60
    kills = sum(totals[f] for f in FAULTS)
    print(f"\n{args.trials} trials x {args.steps} steps in {minutes:.1f} min (seed {args.seed})")
    print("| kills survived (SIGKILL / SIGTERM / SIGINT) | disk-full saves survived | undecodable rows | bytes lost |")
    print("|---|---|---|---|")
    print(f"| {kills - totals['disk_full']} ({totals['sigkill']} / {totals['sigterm']} / {totals['sigint']}) | "
          f"{totals['disk_full']} | {totals['bad_rows']} | {lost} |")  # fmt: skip
    if not args.keep:
        shutil.rmtree(root)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
