"""Faults a user causes (issue #16): each ends in one line naming the file/flag, key and value — never a hang."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.config import ConfigError, load_config
from diffalign.data import DataError
from diffalign.trainers import DPOTrainer, get_trainer
from helpers import tiny_config


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_table_of_only_undecodable_images_stops_with_one_line(tiny_sd_path, tmp_path):
    rows = [{"caption": "a red square", "jpg_0": b"not an image", "jpg_1": _jpeg(), "label_0": 1, "label_1": 0}] * 3
    data = tmp_path / "bad.parquet"
    pd.DataFrame(rows).to_parquet(data)
    cfg = tiny_config(DPOTrainer, tiny_sd_path, data, tmp_path / "out", resolution=16, batch_size=1, max_steps=2)
    with pytest.raises(
        DataError, match=r"0 of 3 rows of .*bad.parquet' usable: .* first seen at row \d, column 'jpg_0'"
    ):
        DPOTrainer(cfg).train()


def test_config_values_that_cannot_train_are_refused():
    DPOConfig = get_trainer("dpo").config_class
    base = ["--model", "m", "--data", "d"]
    with pytest.raises(ConfigError, match=r"`beta`.*finite.*got inf"):
        load_config(DPOConfig, None, [*base, "--beta", ".inf"])
    with pytest.raises(ConfigError, match=r"`--batch_size` needs a value"):
        load_config(DPOConfig, None, [*base, "--batch_size"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 5000\nlora_rank: [8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line \d+, column \d+: "):
        load_config(get_trainer("dpo").config_class, bad, ["--model", "m", "--data", "d"])


def test_unwritable_output_dir_is_one_line_exit_2(tiny_sd_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    data = tmp_path / "pairs.parquet"
    row = {"caption": "a red square", "jpg_0": _jpeg(), "jpg_1": _jpeg(), "label_0": 1, "label_1": 0}
    pd.DataFrame([row]).to_parquet(data)
    args = ["train", "dpo", "--model", str(tiny_sd_path), "--data", str(data), "--output_dir", str(blocker / "run"),
            "--resolution", "16", "--max_steps", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError)
    assert "`output_dir`" in str(result.exception) and "cannot be created" in str(result.exception)


def test_user_errors_exit_2_from_the_command_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "diffalign", "train", "dpo", "--model", "m", "--beta", ".inf"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("error:")


@pytest.mark.parametrize(
    "method, change, message",
    [("kto", {}, r"trained with method 'dpo', this run has 'kto'"),
     ("dpo", {"lora_rank": 8}, r"trained with lora_rank 4, this run has 8")],
)  # fmt: skip
def test_resume_refuses_another_method_or_adapter_layout(method, change, message, tiny_sd_path, tmp_path):
    import scale_cases

    data = scale_cases.write_data(tmp_path / "data")
    scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", 2, 1, max_steps=2, checkpointing_steps=2)
    with pytest.raises(ConfigError, match=message):
        scale_cases.run(method, tiny_sd_path, data[method], tmp_path / "out", 2, 1, max_steps=4, resume="latest",
                        **change)  # fmt: skip


@pytest.mark.parametrize("lora_rank, source", [(4, "final"), (0, "checkpoint-1")])
def test_init_from_starts_another_method_from_the_trained_weights(lora_rank, source, tiny_sd_path, tmp_path):
    """The deliberate method change the resume refusal points to: KTO starts from a DPO run's weights (LoRA from
    final/, full fine-tune from a checkpoint), step 0, while the reference stays the base model."""
    import torch

    import scale_cases
    from diffalign.export.runs import load_run
    from diffalign.trainers.kto import KTOTrainer

    data = scale_cases.write_data(tmp_path / "data")
    scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "dpo", 2, 1, max_steps=1, checkpointing_steps=1,
                    lora_rank=lora_rank)  # fmt: skip
    init = str(tmp_path / "dpo" / source)
    trainer = KTOTrainer(scale_cases.config("kto", tiny_sd_path, data["kto"], tmp_path / "kto", 2, 1,
                                            lora_rank=lora_rank, init_from=init))  # fmt: skip
    trainer.setup()
    dpo = load_run(tmp_path / "dpo" / source)
    if lora_rank:
        module, (down, up) = next(iter(dpo.lora.items()))
        name = module.split(".", 1)[1]
        named = dict(trainer.denoiser.named_parameters())
        assert torch.equal(named[f"{name}.lora_A.default.weight"], down)
        assert torch.equal(named[f"{name}.lora_B.default.weight"], up) and up.abs().sum() > 0  # B trained from 0
    else:
        key, trained = next((k, v) for k, v in dpo.denoiser_state.items() if "attn1.to_q" in k)
        assert torch.equal(trainer.denoiser.state_dict()[key], trained)
        assert not torch.equal(trainer.ref_copy.state_dict()[key], trained)  # the reference is still the base
    assert trainer.train().is_dir() and trainer.global_step == 1  # from step 0, max_steps 1


def test_init_from_with_another_lora_layout_is_one_line(tiny_sd_path, tmp_path):
    import scale_cases

    data = scale_cases.write_data(tmp_path / "data")
    scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "dpo", 2, 1, max_steps=1, checkpointing_steps=0)
    with pytest.raises(ConfigError, match=r"holds a LoRA of rank 4, alpha 4; this run has lora_rank 8, lora_alpha 8"):
        scale_cases.run("kto", tiny_sd_path, data["kto"], tmp_path / "kto", 2, 1, lora_rank=8,
                        init_from=str(tmp_path / "dpo"))  # fmt: skip


def test_a_diverged_run_exits_1_with_one_line(tiny_sd_path, tmp_path):
    import scale_cases

    data = scale_cases.write_data(tmp_path / "data")["dpo"]
    run = subprocess.run([sys.executable, "-m", "diffalign", "train", "dpo", "--model", str(tiny_sd_path), "--data",
                          data, "--output_dir", str(tmp_path / "out"), "--resolution", "16", "--lora_rank", "4",
                          "--beta", "1e38", "--max_steps", "5", "--max_nonfinite_steps", "2"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1 and "error: 2 steps in a row" in run.stderr and "Traceback" not in run.stderr


def test_rows_skipped_for_a_bad_label_or_caption_are_named(tmp_path, caplog):
    import logging

    from diffalign.data import PreferencePairs

    good = {"caption": "a red square", "jpg_0": _jpeg(), "jpg_1": _jpeg(), "label_0": 1.0, "label_1": 0.0}
    rows = [good, {**good, "label_0": 0.3}, good, {**good, "caption": "  "}, {**good, "label_1": 7.0}]
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    with caplog.at_level(logging.INFO, logger="diffalign.data.base"):
        pairs = PreferencePairs(str(tmp_path / "pairs.parquet"), resolution=16)
    assert pairs.stats["bad_label"] == 2 and pairs.skipped_rows == {"bad_label": [1, 4], "bad_caption": [3]}
    assert "bad_label=2 (rows 1, 4)" in caplog.text and "bad_caption=1 (row 3)" in caplog.text


def test_disk_full_while_checkpointing_names_the_path_and_keeps_the_previous_one(tiny_sd_path, tmp_path, monkeypatch):
    import errno

    import scale_cases
    from diffalign.trainers.base import CheckpointWriteError

    data = scale_cases.write_data(tmp_path / "data")["dpo"]
    trainer = DPOTrainer(scale_cases.config("dpo", tiny_sd_path, data, tmp_path / "out", 2, 1, max_steps=3,
                                            checkpointing_steps=1, learning_rate=1e-3))  # fmt: skip
    trainer.setup()
    original = trainer.accelerator.save_state

    def fill_the_disk(path, *args, **kwargs):
        if path.endswith("-2"):
            original(path, *args, **kwargs)  # half the files written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", fill_the_disk)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-2 .* no space left on the device; the previous "
                                                   r"checkpoint .*checkpoint-1 is intact"):  # fmt: skip
        trainer.train()
    assert not list((tmp_path / "out").glob(".tmp-checkpoint-*"))
    assert (tmp_path / "out" / "checkpoint-1" / "trainer_state.json").is_file()


def test_resume_after_a_skipped_micro_batch_is_exact_and_keeps_the_counts(tiny_sd_path, tmp_path):
    """Batch size 1 with an undecodable image: the micro-batch holding it is passed over. A run stopped after that
    and resumed must continue at the same sample (bit-exact weights) and keep counting from where it was."""
    import scale_cases
    from helpers import png_bytes, read_metrics

    good = {"caption": "a red square", "jpg_0": png_bytes((200, 30, 30), 20), "jpg_1": _jpeg(), "label_0": 1,
            "label_1": 0}  # fmt: skip
    rows = [good, {**good, "jpg_0": b"not an image"}, {**good, "caption": "a blue square"}]
    data = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(data)  # 3 rows: the first epoch (steps 1-3) meets the bad one

    def run(out, steps, **kw):
        cfg = tiny_config(DPOTrainer, tiny_sd_path, data, out, resolution=16, batch_size=1, max_steps=steps,
                          checkpointing_steps=3, **kw)  # fmt: skip
        DPOTrainer(cfg).train()

    run(tmp_path / "straight", 7)
    run(tmp_path / "resumed", 3)
    state = json.loads((tmp_path / "resumed" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stream_offsets"] == [state["skipped_samples"]] and state["skipped_samples"] >= 1  # batch 1
    run(tmp_path / "resumed", 7, resume="latest")

    a, b = scale_cases.trained(tmp_path / "straight"), scale_cases.trained(tmp_path / "resumed")
    assert scale_cases.max_relative_difference(a, b) == 0.0
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["skipped_samples"] for m in resumed] == [m["skipped_samples"] for m in straight]
    assert straight[-1]["skipped_samples"] > state["skipped_samples"]  # the bad row was met after the resume too
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]


def test_resume_on_another_world_size_after_uneven_skips_is_refused():
    from types import SimpleNamespace

    from diffalign.trainers.base import Trainer

    me = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, process_index=0))
    Trainer._restore_counters(me, {"stream_offsets": [0, 0], "skipped_samples": 3}, "ckpt")  # nothing passed over
    assert (me.stream_offset, me.skipped_samples, me.nonfinite_steps) == (0, 3, 0)
    with pytest.raises(
        ConfigError, match=r"cannot resume 'ckpt' on 1 processes: .* \(offsets \[1, 0\]\).*resume on 2 processes"
    ):
        Trainer._restore_counters(me, {"stream_offsets": [1, 0]}, "ckpt")


@pytest.mark.parametrize("damage, message", [
    ("random_states_0.pkl", r"random_states_0.pkl changed since it was saved \(sha256 differs\)"),
    ("trainable.safetensors", r"trainable.safetensors has 10 bytes, \d+ were saved"),
])  # fmt: skip
def test_a_damaged_checkpoint_is_refused_naming_the_file(damage, message, tiny_sd_path, tmp_path):
    """accelerate skips an unreadable RNG-state file with an info line; the manifest written at save catches it."""
    import scale_cases

    data = scale_cases.write_data(tmp_path / "data")["dpo"]
    scale_cases.run("dpo", tiny_sd_path, data, tmp_path / "out", 2, 1, max_steps=2, checkpointing_steps=1)
    target = tmp_path / "out" / "checkpoint-2" / damage
    size = target.stat().st_size
    target.write_bytes(b"\0" * size if damage.endswith(".pkl") else b"0123456789")
    with pytest.raises(ConfigError, match=rf"checkpoint .*checkpoint-2' is damaged: {message}; resume from an "
                                          r"earlier checkpoint \(.*checkpoint-1\)"):  # fmt: skip
        scale_cases.run("dpo", tiny_sd_path, data, tmp_path / "out", 2, 1, max_steps=3, resume="latest")


def test_a_table_left_empty_by_filtering_is_one_line_exit_2(tmp_path):
    tie = {"caption": "a red square", "jpg_0": _jpeg(), "jpg_1": _jpeg(), "label_0": 0.5, "label_1": 0.5}
    pd.DataFrame([tie, tie]).to_parquet(tmp_path / "ties.parquet")
    run = subprocess.run([sys.executable, "-m", "diffalign", "train", "dpo", "--model", "toy", "--data",
                          str(tmp_path / "ties.parquet"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]  # above it: the model's loading bars
    assert last.startswith("error: no training samples left in") and "ties_dropped=2" in last
