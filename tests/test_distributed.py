"""Many processes: the same update at 1 × 4 and 2 processes × 2 for every method, checkpoint-every-step without a
race, resume across processes, the launch forms, and the guards (WORLD_SIZE, one run per output_dir, layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import scale_cases
from diffalign.config import ConfigError
from diffalign.trainers import DPOTrainer
from diffalign.trainers.distributed import LaunchError, OutputDirLock, check_world_size, global_mean
from helpers import read_metrics

TESTS = Path(__file__).parent
LAUNCH_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", *args]
    run = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def two_process_runs(tiny_sd_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_procs")
    _launch(str(TESTS / "distributed_runner.py"), str(root), str(tiny_sd_path))
    return root


@pytest.mark.parametrize("method", scale_cases.METHODS)
def test_two_processes_equal_one_process(method, two_process_runs, tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")
    scale_cases.run(method, tiny_sd_path, data[method], tmp_path / "1x4", batch_size=4, ga=1)
    one, two = scale_cases.trained(tmp_path / "1x4"), scale_cases.trained(two_process_runs / f"{method}-2x2")
    assert max(v.abs().max().item() for v in one.values()) > 1e-4
    assert scale_cases.max_relative_difference(one, two) <= scale_cases.REL_TOL


def test_latent_cache_is_encoded_by_the_main_process_only(two_process_runs):
    rank0 = int((two_process_runs / "vae-images-rank0.txt").read_text())
    rank1 = int((two_process_runs / "vae-images-rank1.txt").read_text())
    assert rank0 == 6 and rank1 == 0  # the 8 pairs hold 6 distinct images (content-hashed), encoded once


def test_checkpoint_every_step_stress_and_state(two_process_runs):
    stress = two_process_runs / "stress"
    assert [r["step"] for r in read_metrics(stress)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in stress.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    assert not list(stress.glob(".tmp-checkpoint-*"))
    state = json.loads((stress / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["batch_size"] == 2 and state["step"] == 6
    assert {p.name for p in (stress / "checkpoint-6").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl"}


def test_resume_across_processes_matches_uninterrupted(two_process_runs):
    straight, split = two_process_runs / "straight", two_process_runs / "split"
    a, b = scale_cases.trained(straight), scale_cases.trained(split)
    assert scale_cases.max_relative_difference(a, b) <= 1e-6
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4]
    for ra, rb in zip(read_metrics(straight), read_metrics(split)):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def test_cli_under_accelerate_launch_logs_one_launch_line(tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")
    run = _launch(
        "-m", "diffalign", "train", "dpo", "--model", str(tiny_sd_path), "--data", data["dpo"],
        "--output_dir", str(tmp_path / "out"), "--resolution", "16", "--batch_size", "2", "--max_steps", "2",
        "--lora_rank", "4", "--checkpointing_steps", "1",
    )  # fmt: skip
    launch_lines = [line for line in run.stderr.splitlines() if "launch: MULTI_CPU" in line]
    assert len(launch_lines) == 1 and "global batch 4" in launch_lines[0]
    assert run.stderr.count("effective batch") == 1  # the banner: main process only
    assert run.stdout.count("final weights:") == 1
    assert (tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "out" / ".diffalign.lock").exists()


def test_torchrun_form_works(tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffalign", "train", "kto",
           "--model", str(tiny_sd_path), "--data", data["kto"], "--output_dir", str(tmp_path / "out"),
           "--resolution", "16", "--batch_size", "2", "--max_steps", "1", "--lora_rank", "4"]  # fmt: skip
    run = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "launch: MULTI_CPU | 2 process(es)" in run.stderr


# ---- single-process guards ------------------------------------------------------------------------------------------
def test_world_size_mismatch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(LaunchError, match=r"WORLD_SIZE=4 .* accelerate sees 1 process.*: launch with"):
        check_world_size(SimpleNamespace(num_processes=1))
    check_world_size(SimpleNamespace(num_processes=4))  # a real 4-process launch passes


def test_second_run_on_one_output_dir_is_refused_and_stale_locks_are_taken(tiny_sd_path, tmp_path):
    lock = OutputDirLock(tmp_path)
    live = {"pid": os.getppid(), "host": os.uname().nodename}
    (tmp_path / ".diffalign.lock").write_text(json.dumps(live))
    with pytest.raises(LaunchError, match=rf"in use by another run \(pid {os.getppid()} on host"):
        lock.acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".diffalign.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    lock.acquire()  # stale: that process has exited
    assert json.loads((tmp_path / ".diffalign.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".diffalign.lock").exists()


def test_trainer_refuses_a_locked_output_dir(tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".diffalign.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    with pytest.raises(LaunchError, match="in use by another run"):
        scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", batch_size=2, ga=1)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_resume_with_another_global_batch_is_refused(tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")
    scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", 2, 1, max_steps=2, checkpointing_steps=2)
    with pytest.raises(ConfigError, match=r"cannot resume .* 2 per device x 1 processes x 1 accumulation, now 4 x 1"):
        scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", 4, 1, max_steps=4, resume="latest")


def test_checkpoint_waits_for_every_rank_before_the_rename(tiny_sd_path, tmp_path, monkeypatch):
    data = scale_cases.write_data(tmp_path / "data")
    trainer = DPOTrainer(scale_cases.config("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", 2, 1))
    trainer.setup()
    calls = []
    acc = trainer.accelerator
    for name in ("save_state", "wait_for_everyone"):
        original = getattr(acc, name)
        monkeypatch.setattr(acc, name, lambda *a, _n=name, _o=original, **k: (calls.append(_n), _o(*a, **k))[1])
    from diffalign.trainers import checkpoint as ckpt

    original_finalize = ckpt.finalize
    monkeypatch.setattr(ckpt, "finalize", lambda *a, **k: (calls.append("finalize"), original_finalize(*a, **k))[1])
    trainer.save_checkpoint()
    save, rename = calls.index("save_state"), calls.index("finalize")
    assert "wait_for_everyone" in calls[save + 1 : rename]


def test_global_mean_counts_every_element():
    acc = SimpleNamespace(reduce=lambda t, reduction: t)
    assert global_mean(acc, torch.tensor([1.0, 2.0, 6.0])).item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    "name, kind",
    [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
     ("deepspeed_zero3", "DEEPSPEED"), ("cpu_2proc", "MULTI_CPU")],
)  # fmt: skip
def test_shipped_accelerate_configs_parse_with_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    from diffalign.config import PRESET_DIR

    config = load_config_from_file(str(PRESET_DIR / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(kind)
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"]
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_slurm_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(TESTS.parent / "scripts" / "slurm_train.sh")]).returncode == 0


def test_a_requested_engine_that_did_not_start_is_refused():
    from diffalign.trainers.distributed import check_engine

    with pytest.raises(LaunchError, match=r"asked for FSDP .* but the Accelerator runs MULTI_CPU"):
        check_engine("MULTI_CPU", lora=False, environ={"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(LaunchError, match=r"asked for DEEPSPEED"):
        check_engine("MULTI_GPU", lora=False, environ={"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(LaunchError, match="LoRA runs do not shard"):
        check_engine("FSDP", lora=True, environ={"ACCELERATE_USE_FSDP": "true"})
    check_engine("FSDP", lora=False, environ={"ACCELERATE_USE_FSDP": "true"})
    check_engine("MULTI_GPU", lora=True, environ={})


def test_a_gathered_state_dict_is_written_as_a_stock_diffusers_folder(tiny_sd_path, tmp_path):
    """What `final/` gets under FSDP / ZeRO-3 (the full state dict gathered from every rank)."""
    from diffusers import UNet2DConditionModel

    data = scale_cases.write_data(tmp_path / "data")
    trainer = DPOTrainer(scale_cases.config("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", 2, 1, lora_rank=0))
    trainer.setup()
    state = {k: v + 1.0 for k, v in trainer.denoiser.state_dict().items()}  # not the base weights
    folder = trainer._save_gathered(tmp_path / "final", state)
    loaded = UNet2DConditionModel.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
