"""The loop and the DPO/KTO trainers on tiny in-test models: values at step 0, what changes and what does not,
resume == uninterrupted, batch × accumulation equivalence, divergence handling, CLI."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.config import ConfigError, build_config
from diffalign.trainers import DPOTrainer, KTOTrainer, TrainingDivergedError, get_trainer
from helpers import read_metrics, tiny_config

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40), (200, 40, 200), (40, 210, 210)]
WORDS = ["red", "green", "blue", "yellow", "purple", "cyan"]


def _jpeg(colour, size=40) -> bytes:
    img = Image.new("RGB", (size, size), colour)
    img.paste((255, 255, 255), (0, 0, size // 2, size // 4))  # asymmetric, so flips and crops matter
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pairs_parquet(tmp_path_factory):
    rows = []
    for i in range(8):
        a, b = i % 6, (i + 1) % 6
        rows.append(
            {
                "caption": f"a {WORDS[a]} square",
                "jpg_0": _jpeg(COLOURS[a]),
                "jpg_1": _jpeg(COLOURS[b]),
                "label_0": 1.0 if i % 2 == 0 else 0.0,
                "label_1": 0.0 if i % 2 == 0 else 1.0,
            }
        )
    rows.append(
        {
            "caption": "a red square",
            "jpg_0": _jpeg(COLOURS[0]),
            "jpg_1": _jpeg(COLOURS[1]),
            "label_0": 0.5,
            "label_1": 0.5,
        }
    )
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _config(trainer_cls, model, data, out, **kw):
    return tiny_config(trainer_cls, model, data, out, **{"resolution": 32, "batch_size": 2, "beta": 50.0, **kw})


_metrics = read_metrics


def _frozen_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("backbone", ["sd", "sdxl", "sd3"])
def test_dpo_lora_steps(backbone, request, pairs_parquet, tmp_path):
    model = request.getfixturevalue(f"tiny_{backbone}_path")
    trainer = DPOTrainer(_config(DPOTrainer, model, pairs_parquet, tmp_path))
    trainer.setup()
    frozen = _frozen_state(trainer)
    lora_before = {n: p.detach().clone() for n, p in trainer._named_trainable()}
    final = trainer.train()  # continues with the set-up trainer

    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    # step 1: LoRA B starts at zero, so policy == reference and the loss is exactly log 2
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["implicit_acc"] == 0.5
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[1]["loss"] != pytest.approx(math.log(2), abs=1e-9)
    changed = [n for n, p in trainer._named_trainable() if not torch.equal(p, lora_before[n])]
    assert changed, "no LoRA weight changed"
    for n, p in trainer.denoiser.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
    weights = load_file(final / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in k for k in weights)
    assert (final / "config.yaml").is_file()


@pytest.mark.parametrize("backbone", ["sd", "sdxl", "sd3"])
def test_dpo_full_finetune_reference_is_frozen_copy(backbone, request, pairs_parquet, tmp_path):
    model = request.getfixturevalue(f"tiny_{backbone}_path")
    trainer = DPOTrainer(_config(DPOTrainer, model, pairs_parquet, tmp_path, lora_rank=0, learning_rate=1e-4))
    final = trainer.train()
    records = _metrics(tmp_path)
    # the copy runs the same weights without autograd (CPU SDPA may pick another kernel): equal up to float noise
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    policy = dict(trainer.denoiser.named_parameters())
    ref = dict(trainer.ref_copy.named_parameters())
    assert any(not torch.equal(policy[n], ref[n]) for n in ref)
    assert not any(p.requires_grad for p in trainer.ref_copy.parameters())
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cls, folder = (SD3Transformer2DModel, "transformer") if backbone == "sd3" else (UNet2DConditionModel, "unet")
    loaded = cls.from_pretrained(final / folder)  # stock diffusers loads the full fine-tune
    trained = trainer.denoiser.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.allclose(value, trained[name]), name


@pytest.mark.parametrize("lora_rank", [4, 0])
@pytest.mark.parametrize("backbone", ["sd", "sdxl", "sd3"])
def test_kto_steps(backbone, lora_rank, request, pairs_parquet, tmp_path):
    model = request.getfixturevalue(f"tiny_{backbone}_path")
    trainer = KTOTrainer(_config(KTOTrainer, model, pairs_parquet, tmp_path, lora_rank=lora_rank, learning_rate=1e-4))
    trainer.train()
    records = _metrics(tmp_path)
    # policy == reference at step 1: z = 0 → loss = 1 − σ(0) = 0.5, reference point clamps to 0
    # (full fine-tunes: the frozen copy equals the policy up to float noise, see the DPO test)
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(records[1]["loss"])


def _final_lora(out):
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


def test_resume_matches_uninterrupted_run(tiny_sd_path, pairs_parquet, tmp_path):
    straight = tmp_path / "straight"
    DPOTrainer(_config(DPOTrainer, tiny_sd_path, pairs_parquet, straight, max_steps=4, random_flip=True)).train()

    split = tmp_path / "split"
    cfg = _config(DPOTrainer, tiny_sd_path, pairs_parquet, split, max_steps=2, checkpointing_steps=2, random_flip=True)
    DPOTrainer(cfg).train()
    assert (split / "checkpoint-2" / "trainer_state.json").is_file()
    cfg = _config(
        DPOTrainer,
        tiny_sd_path,
        pairs_parquet,
        split,
        max_steps=4,
        checkpointing_steps=2,
        random_flip=True,
        resume="latest",
    )
    DPOTrainer(cfg).train()

    a, b = _final_lora(straight), _final_lora(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [r["step"] for r in _metrics(split)] == [1, 2, 3, 4]
    for ra, rb in zip(_metrics(straight), _metrics(split)):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def test_batch_equals_accumulation(tiny_sd_path, pairs_parquet, tmp_path):
    # adam_epsilon=1 makes the first Adam update ≈ -lr·g (not ±lr·sign(g)), so gradients are compared for real
    common = dict(max_steps=1, learning_rate=1.0, adam_epsilon=1.0)
    one = _config(DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path / "b4", batch_size=4, **common)
    four = _config(
        DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path / "b1", batch_size=1, gradient_accumulation_steps=4, **common
    )
    DPOTrainer(one).train()
    DPOTrainer(four).train()
    a, b = _final_lora(tmp_path / "b4"), _final_lora(tmp_path / "b1")
    ups = [k for k in a if "lora.up" in k or "lora_B" in k]
    assert ups and max(a[k].abs().max().item() for k in ups) > 1e-3  # LoRA B starts at 0: it really moved
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6), k
    assert _metrics(tmp_path / "b4")[0]["loss"] == pytest.approx(_metrics(tmp_path / "b1")[0]["loss"], abs=1e-6)


def test_nan_loss_steps_are_skipped_then_the_run_stops_with_finite_weights_saved(
    tiny_sd_path, pairs_parquet, tmp_path
):
    class Exploding(DPOTrainer):
        def compute_loss(self, batch, generators):
            loss, stats = super().compute_loss(batch, generators)
            return (loss * float("nan") if self.global_step >= 1 else loss), stats

    cfg = _config(Exploding, tiny_sd_path, pairs_parquet, tmp_path, max_steps=6, checkpointing_steps=1,
                  max_nonfinite_steps=2)  # fmt: skip
    trainer = Exploding(cfg)
    with pytest.raises(TrainingDivergedError, match=r"2 steps in a row \(to step 3\) .* saved in .*checkpoint-3"):
        trainer.train()
    after_1 = load_file(tmp_path / "checkpoint-1" / "trainable.safetensors")
    after_3 = load_file(tmp_path / "checkpoint-3" / "trainable.safetensors")
    assert all(torch.equal(after_1[k], after_3[k]) and torch.isfinite(after_3[k]).all() for k in after_1)
    assert [r["nonfinite_steps"] for r in _metrics(tmp_path)] == [0, 1]


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])  # checked by Σ g², or by the clip's total norm
def test_one_nan_step_is_skipped_and_counted(max_grad_norm, tiny_sd_path, pairs_parquet, tmp_path):
    class Hiccup(DPOTrainer):
        def compute_loss(self, batch, generators):
            loss, stats = super().compute_loss(batch, generators)
            return (loss * float("nan") if self.global_step == 1 else loss), stats

    Hiccup(_config(Hiccup, tiny_sd_path, pairs_parquet, tmp_path, max_steps=3, max_grad_norm=max_grad_norm)).train()
    assert [r["nonfinite_steps"] for r in _metrics(tmp_path)] == [0, 1, 1]
    assert all(torch.isfinite(v).all() for v in _final_lora(tmp_path).values())


def test_a_huge_beta_with_inf_gradients_does_not_exit_quietly(tiny_sd_path, pairs_parquet, tmp_path):
    cfg = _config(DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path, beta=1e38, max_steps=5, max_nonfinite_steps=2)
    with pytest.raises(TrainingDivergedError, match="non-finite loss or gradients"):
        DPOTrainer(cfg).train()


def test_bf16_runs_on_cpu(tiny_sd_path, pairs_parquet, tmp_path):
    DPOTrainer(_config(DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path, max_steps=1, mixed_precision="bf16")).train()
    assert math.isfinite(_metrics(tmp_path)[0]["loss"])


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        build_config(get_trainer("dpo").config_class, {"model": "m", "data": "d", "bta": 1})
    with pytest.raises(ConfigError, match="`resolution` must be a positive multiple of 8, got 500"):
        build_config(get_trainer("dpo").config_class, {"model": "m", "data": "d", "resolution": 500})
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        get_trainer("ppo")


def test_cli_train_dpo_with_preset(tiny_sd_path, pairs_parquet, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "dpo", "--config", "configs/sd15_dpo_lora.yaml", "--model", str(tiny_sd_path), "--data"]
    args += [pairs_parquet, "--output_dir", str(out), "--resolution", "32", "--batch_size", "2"]
    args += ["--gradient_accumulation_steps", "1", "--max_steps", "1", "--no-gradient_checkpointing"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "final weights" in result.output


def test_cli_rejects_unknown_key():
    code = "from diffalign.cli import main; main()"
    args = ["train", "dpo", "--model", "m", "--data", "d", "--bta", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key(s) 'bta' (did you mean 'beta'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lora_output_changes_a_stock_pipeline(tiny_sd_path, pairs_parquet, tmp_path):
    from diffusers import StableDiffusionPipeline

    final = DPOTrainer(_config(DPOTrainer, tiny_sd_path, pairs_parquet, tmp_path, learning_rate=5e-2)).train()

    def sample(pipe):
        gen = torch.Generator().manual_seed(0)
        return pipe("a red square", num_inference_steps=2, generator=gen, output_type="pt").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = sample(pipe)
    pipe.load_lora_weights(final)  # stock diffusers, no diffalign involved
    after = sample(pipe)
    assert (after - before).abs().max() > 1e-3


def test_corrupt_rows_are_skipped_and_counted(tiny_sd_path, tmp_path):
    rows = [
        {"caption": "a red square", "jpg_0": _jpeg(COLOURS[0]), "jpg_1": _jpeg(COLOURS[1]), "label_0": 1, "label_1": 0}
        for _ in range(3)
    ]
    rows[1]["jpg_1"] = b"not an image"
    data = tmp_path / "bad.parquet"
    pd.DataFrame(rows).to_parquet(data)
    trainer = DPOTrainer(_config(DPOTrainer, tiny_sd_path, str(data), tmp_path / "out", batch_size=3, max_steps=1))
    trainer.train()
    assert _metrics(tmp_path / "out")[0]["skipped_samples"] == 1
    assert trainer.dataset.stats["undecodable"] == 1


def test_v_prediction_and_latent_cache(tiny_sd_v_path, pairs_parquet, tmp_path):
    compare = dict(learning_rate=1.0, adam_epsilon=1.0)  # update ≈ −lr·g: compares gradients, not Adam signs
    plain = DPOTrainer(_config(DPOTrainer, tiny_sd_v_path, pairs_parquet, tmp_path / "plain", **compare))
    plain.train()
    cfg = _config(DPOTrainer, tiny_sd_v_path, pairs_parquet, tmp_path / "cached", cache_latents=True, **compare)
    DPOTrainer(cfg).train()
    assert list((tmp_path / "cached" / "cache").rglob("*.safetensors"))
    a, b = _final_lora(tmp_path / "plain"), _final_lora(tmp_path / "cached")
    for k in a:  # the cache is exact up to the VAE's batch-size rounding (~1e-7 on latents)
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6), k
    for ra, rb in zip(_metrics(tmp_path / "plain"), _metrics(tmp_path / "cached")):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)


def test_validation_images_and_ema(tiny_sd_path, pairs_parquet, tmp_path):
    cfg = _config(
        DPOTrainer,
        tiny_sd_path,
        pairs_parquet,
        tmp_path / "ema",
        validation_steps=2,
        validation_prompts=["a red square", "a blue square"],
        validation_num_inference_steps=2,
        resolution=16,
        ema_decay=0.5,
    )
    trainer = DPOTrainer(cfg)
    trainer.train()
    grid = Image.open(tmp_path / "ema" / "validation" / "step-000002.png")
    assert grid.size[1] >= 2 * 128  # one row (of at least 128 px) per prompt
    raw = {n: p.detach() for n, p in trainer._named_trainable()}
    saved = _final_lora(tmp_path / "ema")
    # final/ holds the EMA weights, which lag the raw ones
    up_raw = [v for n, v in raw.items() if "lora_B" in n]
    up_saved = [v for k, v in saved.items() if "lora.up" in k or "lora_B" in k]
    assert sum(v.abs().sum() for v in up_saved) < sum(v.abs().sum() for v in up_raw)


def test_precision_and_optimizer_fallbacks(caplog):
    from diffalign.trainers.hardware import resolve_mixed_precision, resolve_optimizer

    assert resolve_mixed_precision("fp16", "cpu") == "no"
    assert "needs a CUDA device" in caplog.text
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert resolve_mixed_precision("fp16", "cuda") == "fp16"
    assert resolve_optimizer("adamw8bit", "cpu") == "adamw"
    assert resolve_optimizer("adafactor", "cpu") == "adafactor"
    with pytest.raises(ValueError, match="`mixed_precision` must be one of"):
        resolve_mixed_precision("fp8", "cpu")
