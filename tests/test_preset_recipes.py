"""Presets that claim an official recipe hold that recipe's values (each read from the official launcher or, where the
launcher leaves a flag unset, the official script's argparse default). β is pinned in `test_preset_betas.py`."""

from __future__ import annotations

import pytest

from diffalign.config import load_config
from diffalign.trainers import get_trainer


def _preset(method: str, name: str):
    return load_config(get_trainer(method).config_class, name, ["--model", "m", "--data", "d"])


@pytest.mark.parametrize("name", ["sd15_dpo", "sdxl_dpo"])
def test_dpo_presets_crop_like_the_official_code(name):
    """SalesforceAIResearch/DiffusionDPO train.py: `RandomCrop if args.random_crop else CenterCrop` with
    `--random_crop` default False and unset in launchers/sd15.sh and sdxl.sh; flips unless `--no_hflip` (unset);
    `--proportion_empty_prompts` default 0.2."""
    official = {"random_crop": False, "no_hflip": False, "proportion_empty_prompts": 0.2}
    cfg = _preset("dpo", name)
    assert cfg.center_crop is (not official["random_crop"])
    assert cfg.random_flip is (not official["no_hflip"])
    assert cfg.proportion_empty_prompts == official["proportion_empty_prompts"]


def test_tdpo_keeps_the_dpo_crop():
    assert _preset("tdpo", "sd15_tdpo").center_crop is True


def test_sd15_kto_is_the_official_recipe():
    """jacklishufan/diffusion-kto exps/example.sh (4 processes) + train_kto_sd_v1.5.py defaults."""
    launcher = {"processes": 4, "train_batch_size": 2, "gradient_accumulation_steps": 1, "max_train_steps": 20000,
                "learning_rate": 1e-7, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 200,
                "positive_ratio": 0.8, "resolution": 512, "checkpointing_steps": 5000}  # fmt: skip
    defaults = {"beta_dpo": 1000, "proportion_empty_prompts": 0.2, "adam_weight_decay": 1e-2, "max_grad_norm": 1.0,
                "lambda_d_kto": 1.0, "lambda_u_kto": 1.0, "random_crop": False, "use_lora": False}  # fmt: skip
    cfg = _preset("kto", "sd15_kto")
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * launcher["processes"]
    assert per_step == launcher["train_batch_size"] * launcher["gradient_accumulation_steps"] * 4 == 8
    assert (cfg.max_steps, cfg.learning_rate, cfg.lr_scheduler, cfg.lr_warmup_steps) == (
        launcher["max_train_steps"],
        launcher["learning_rate"],
        launcher["lr_scheduler"],
        launcher["lr_warmup_steps"],
    )
    assert cfg.desirable_ratio == launcher["positive_ratio"]
    assert (cfg.resolution, cfg.checkpointing_steps) == (launcher["resolution"], launcher["checkpointing_steps"])
    assert cfg.beta == defaults["beta_dpo"]
    assert cfg.proportion_empty_prompts == defaults["proportion_empty_prompts"]
    assert (cfg.adam_weight_decay, cfg.max_grad_norm) == (defaults["adam_weight_decay"], defaults["max_grad_norm"])
    assert (cfg.desirable_weight, cfg.undesirable_weight) == (defaults["lambda_d_kto"], defaults["lambda_u_kto"])
    assert cfg.center_crop is (not defaults["random_crop"]) and cfg.random_flip
    assert (cfg.lora_rank == 0) is (not defaults["use_lora"])
    assert cfg.kl_scope == "step"  # = the official per-step mean over its 8 images at any layout


def test_kto_variant_is_not_the_official_recipe():
    cfg = _preset("kto", "sd15_kto_lora")
    assert cfg.lora_rank == 8 and cfg.desirable_ratio is None
