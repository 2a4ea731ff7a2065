"""Full fine-tuning under FSDP2 on 2 CPU processes (gloo): the reference is sharded, one step equals the unsharded
1 × 4 step, sharded checkpoints resume bit-exactly, and final/ is a stock diffusers folder (issue #15 item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import scale_cases
from diffalign.trainers.distributed import LaunchError
from diffalign.trainers.sharding import check_sharded_run, deepspeed_reference_config
from test_distributed import LAUNCH_ENV, TESTS


@pytest.fixture(scope="module")
def fsdp_runs(tiny_sd_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           str(TESTS / "fsdp_runner.py"), str(root), str(tiny_sd_path)]  # fmt: skip
    run = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    assert json.loads((folder / "final" / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    return UNet2DConditionModel.from_pretrained(folder / "final" / "unet").state_dict()


def test_the_reference_is_sharded_not_replicated(fsdp_runs):
    for rank in (0, 1):
        facts = json.loads((fsdp_runs / f"reference-rank{rank}.json").read_text())
        assert facts["distributed_type"] == "FSDP" and facts["all_sharded"]
        assert facts["local_numel"] <= facts["full_numel"] / 2 + 64  # half of it, up to padding of uneven dims


def test_one_fsdp_step_equals_the_unsharded_step(fsdp_runs, tiny_sd_path, tmp_path):
    """2 processes × 2 under FSDP2 vs 1 process × 4 without sharding: same update to 1e-4 relative (reduce-scatter
    sums in another order)."""
    data = scale_cases.write_data(tmp_path / "data")["dpo"]
    scale_cases.run("dpo", tiny_sd_path, data, tmp_path / "one", 4, 1, lora_rank=0)
    sharded, single = _unet(fsdp_runs / "fsdp-2x2"), _unet(tmp_path / "one")
    base = _unet_base(tiny_sd_path)
    assert scale_cases.max_relative_difference(single, base) > 1e-3  # the step moved the weights
    assert scale_cases.max_relative_difference(sharded, single) < 1e-4


def _unet_base(model: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(Path(model) / "unet").state_dict()


def test_sharded_checkpoints_resume_exactly(fsdp_runs):
    checkpoint = fsdp_runs / "split" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    straight, split = _unet(fsdp_runs / "straight"), _unet(fsdp_runs / "split")
    assert scale_cases.max_relative_difference(straight, split) == 0.0


def test_what_sharded_runs_do_not_do_is_refused_up_front():
    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    plain = SimpleNamespace(validation_steps=0, validation_data=None, validation_prompts=[])
    with pytest.raises(LaunchError, match=r"fsdp_version: 2"):
        check_sharded_run(fsdp1, "FSDP", plain)
    fsdp2 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    check_sharded_run(fsdp2, "FSDP", plain)
    validating = SimpleNamespace(validation_steps=10, validation_data="val.parquet", validation_prompts=[])
    with pytest.raises(LaunchError, match=r"not available under DEEPSPEED .* `validation_steps: 0`"):
        check_sharded_run(None, "DEEPSPEED", validating)


def test_the_zero_reference_is_sharded_only_under_stage_3():
    stage3 = {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}
    zero3 = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": stage3}
    assert deepspeed_reference_config(zero3) == {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        "bf16": {"enabled": True},
    }
    zero2 = {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}
    assert deepspeed_reference_config(zero2)["zero_optimization"] == {"stage": 0}
    assert deepspeed_reference_config(zero2)["fp16"] == {"enabled": True}


def test_fsdp_on_an_accelerate_whose_checkpoints_did_not_resume_exactly_is_refused(monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate, "__version__", "1.12.0")  # the floors job: FSDP2 resume was not exact there
    fsdp2 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    plain = SimpleNamespace(validation_steps=0, validation_data=None, validation_prompts=[])
    with pytest.raises(LaunchError, match=r"FSDP runs need accelerate >= 1.16 \(with 1.12.0"):
        check_sharded_run(fsdp2, "FSDP", plain)
