"""Trackers end to end: tensorboard and wandb (offline) runs read back with their own readers; validation images,
reward curve, and validation leaving training untouched."""

from __future__ import annotations

import json

import pytest
import yaml

from diffalign.toyworld import pipeline_path, prompts
from diffalign.trainers import DPOTrainer, KTOTrainer
from diffalign.trainers.tracking import tracker_config
from helpers import read_metrics, tiny_config
from test_trainers import pairs_parquet  # noqa: F401  (module fixture)

LISTS = dict(validation_prompts=["a red square", "a blue square"], lora_target_modules=["to_q", "to_v"])


def _run(trainer_cls, model, data, out, **kw):
    values = {"resolution": 16, "batch_size": 2, "beta": 50.0, "max_steps": 3, **LISTS, **kw}
    trainer_cls(tiny_config(trainer_cls, model, data, out, **values)).train()
    return read_metrics(out)


def test_tracker_config_is_scalars_only():
    flat = tracker_config({"a": [1, 2], "b": None, "c": 1.5, "d": {"name": "toy"}, "e": True})
    assert flat == {"a": "[1, 2]", "b": "none", "c": 1.5, "d": '{"name": "toy"}', "e": True}


@pytest.mark.parametrize("trainer_cls", [DPOTrainer, KTOTrainer])
def test_tensorboard_run_reads_back(trainer_cls, tiny_sd_path, pairs_parquet, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = _run(
        trainer_cls, tiny_sd_path, pairs_parquet, tmp_path, report_to="tensorboard",
        validation_steps=3, validation_num_inference_steps=2,
    )  # fmt: skip
    events = EventAccumulator(str(tmp_path / "diffalign"), size_guidance={"images": 0, "tensors": 0}).Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics]
    assert "implicit_acc" in events.Tags()["scalars"] or trainer_cls is KTOTrainer
    assert {"val/base", "val/current"} <= set(events.Tags()["images"])
    assert events.Images("val/current")[0].step == 3
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "validation_prompts" in config_text and "a blue square" in config_text
    hparams = next((tmp_path / "diffalign").glob("*/hparams.yml"))
    recorded = yaml.safe_load(hparams.read_text())
    assert recorded["lora_target_modules"] == '["to_q", "to_v"]' and recorded["beta"] == 50.0


def test_wandb_offline_run_reads_back(tiny_sd_path, pairs_parquet, tmp_path, monkeypatch):  # noqa: F811
    import wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = _run(
        DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path / "out", report_to="wandb", validation_steps=3,
        validation_num_inference_steps=2,
    )  # fmt: skip
    run_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = wandb_records.wait_for_rows(run_file, "loss", len(metrics))
    assert [(int(r["_step"]), float(r["loss"])) for r in rows] == [
        (m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics
    ]
    images = [r for r in wandb_records.history(run_file) if "val/current/count" in r]
    assert [(int(r["_step"]), int(r["val/current/count"]), int(r["val/base/count"])) for r in images] == [(3, 2, 2)]
    assert json.loads(images[0]["val/current/captions"]) == LISTS["validation_prompts"]
    config = wandb_records.config(run_file)
    assert json.loads(config["beta"]) == 50.0 and json.loads(config["lora_target_modules"]) == ["to_q", "to_v"]


def test_validation_does_not_change_training(tiny_sd_path, pairs_parquet, tmp_path):  # noqa: F811
    plain = _run(DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path / "plain")
    validated = _run(
        DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path / "val", validation_steps=1,
        validation_num_inference_steps=2,
    )  # fmt: skip
    assert [m["loss"] for m in validated] == [m["loss"] for m in plain]
    grid = tmp_path / "val" / "validation" / "step-000001.png"
    assert grid.is_file()


def test_validation_reward_curve_on_the_toy_model(pairs_parquet, tmp_path):  # noqa: F811
    captions = prompts("heldout")[:2]
    _run(
        DPOTrainer, pipeline_path(), pairs_parquet, tmp_path, resolution=32, max_steps=2, validation_steps=1,
        validation_prompts=captions, validation_num_inference_steps=4, validation_guidance_scale=3.0,
        validation_reward="toy",
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["val/reward"] <= 1.0 for r in records)
    assert len({r["val/reward_base"] for r in records}) == 1  # the base is scored once


def test_validation_log_is_truncated_on_resume(pairs_parquet, tmp_path):  # noqa: F811
    values = dict(resolution=32, max_steps=3, validation_steps=1, validation_prompts=prompts("heldout")[:1],
                  validation_num_inference_steps=2, validation_reward="toy", checkpointing_steps=1)  # fmt: skip
    _run(DPOTrainer, pipeline_path(), pairs_parquet, tmp_path, **values)
    _run(DPOTrainer, pipeline_path(), pairs_parquet, tmp_path, resume=str(tmp_path / "checkpoint-1"), **values)
    steps = [json.loads(line)["step"] for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_held_out_implicit_accuracy_without_changing_training(tiny_sd_path, pairs_parquet, tmp_path):  # noqa: F811
    plain = _run(DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path / "plain")
    held = _run(DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path / "held", validation_steps=1,
                validation_data=pairs_parquet, validation_max_samples=6)  # fmt: skip
    assert [m["loss"] for m in held] == [m["loss"] for m in plain]
    records = [json.loads(line) for line in (tmp_path / "held" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0.0 <= r["val/implicit_acc"] <= 1.0 and abs(r["val/loss"] - 0.6931) < 0.05
        assert {"val/reward_margin", "val/model_err_w"} <= set(r)
    assert len({r["val/loss"] for r in records}) > 1  # the weights moved between validations
