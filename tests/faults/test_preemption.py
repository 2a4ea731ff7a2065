"""SIGTERM / SIGINT (SLURM, spot instances, Ctrl-C): the step in flight completes, a checkpoint is saved, the CLI exits
143 / 130, and `--resume latest` continues to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import scale_cases

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(model, data, out, steps, *extra):
    return [sys.executable, "-m", "diffalign", "train", "dpo", "--model", str(model), "--data", data,
            "--output_dir", str(out), "--resolution", "16", "--batch_size", "2", "--lora_rank", "4",
            "--learning_rate", "1e-3", "--max_steps", str(steps), "--checkpointing_steps", "1000", *extra]  # fmt: skip


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_resume_is_exact(sig, code, tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")["dpo"]
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(tiny_sd_path, data, out, 100_000), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    (checkpoint,) = out.glob("checkpoint-*")
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert step >= 3 and f"after step {step}" in stderr and "--resume latest" in stderr
    assert not list(out.glob(".tmp-checkpoint-*")) and not (out / ".diffalign.lock").exists()

    resumed = subprocess.run(_cli(tiny_sd_path, data, out, step + 2, "--resume", "latest"), env=ENV,
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(_cli(tiny_sd_path, data, tmp_path / "straight", step + 2), env=ENV,
                              capture_output=True, text=True)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = scale_cases.trained(out), scale_cases.trained(tmp_path / "straight")
    assert scale_cases.max_relative_difference(a, b) == 0.0


def test_orphaned_temporary_checkpoints_are_removed_at_start(tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")["dpo"]
    orphan = tmp_path / "run" / ".tmp-checkpoint-7"
    orphan.mkdir(parents=True)
    (orphan / "half-written.bin").write_bytes(b"x")
    run = subprocess.run(_cli(tiny_sd_path, data, tmp_path / "run", 1), env=ENV, capture_output=True, text=True)
    assert run.returncode == 0 and not orphan.exists()
