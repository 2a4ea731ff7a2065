"""Diffusion-NPO = Diffusion-DPO on swapped pairs: same inputs, same t and ε, opposite margin; β convention; CLI."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.config import build_config, load_config
from diffalign.trainers import DPOTrainer, NPOTrainer, get_trainer
from helpers import png_bytes, tiny_config

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40)]
WORDS = ["red", "green", "blue", "yellow"]


def _png(colour, size=24) -> bytes:
    return png_bytes(colour, size)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = []
    for i in range(6):
        a, b = i % 4, (i + 1) % 4
        rows.append(
            {
                "caption": f"a {WORDS[a]} square",
                "jpg_0": _png(COLOURS[a]),
                "jpg_1": _png(COLOURS[b]),
                "label_0": 1.0 if i % 2 == 0 else 0.0,
                "label_1": 0.0 if i % 2 == 0 else 1.0,
            }
        )
    path = tmp_path_factory.mktemp("npo_pairs") / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _cfg(cls, model, data, out, **kw):
    return tiny_config(cls, model, data, out, **{"resolution": 16, "batch_size": 1, "beta": 50.0, **kw})


def _perturb_lora(trainer, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer._named_trainable():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def test_npo_is_dpo_with_swapped_pairs(tiny_sd_path, pairs, tmp_path):
    dpo = DPOTrainer(_cfg(DPOTrainer, tiny_sd_path, pairs, tmp_path / "dpo"))
    npo = NPOTrainer(_cfg(NPOTrainer, tiny_sd_path, pairs, tmp_path / "npo"))
    for t in (dpo, npo):
        t.setup()
        _perturb_lora(t)  # identical policy ≠ reference in both
    key = [(0, 2)]
    batch_d, batch_n = _collate(dpo.dataset, key), _collate(npo.dataset, key)
    assert torch.equal(batch_n["pixels_w"], batch_d["pixels_l"])
    assert torch.equal(batch_n["pixels_l"], batch_d["pixels_w"])
    gens = lambda: [torch.Generator().manual_seed(11)]  # noqa: E731 - the same t, ε and dropout for both
    with torch.no_grad():
        loss_d, stats_d = dpo.compute_loss(batch_d, gens())
        loss_n, stats_n = npo.compute_loss(batch_n, gens())
    margin = float(stats_d["reward_margin"])
    assert abs(margin) > 1e-4  # the perturbation makes policy ≠ reference
    assert float(stats_n["reward_margin"]) == pytest.approx(-margin, rel=1e-5, abs=1e-7)  # opposite sign, same size
    assert float(stats_n["model_err_w"]) == pytest.approx(float(stats_d["model_err_l"]), rel=1e-6)
    # one pair: loss = softplus(−inside), so DPO − NPO = softplus(−m) − softplus(m) = −m
    assert float(loss_d) == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-5)
    assert float(loss_n) == pytest.approx(math.log1p(math.exp(margin)), rel=1e-5)
    assert float(loss_d - loss_n) == pytest.approx(-margin, rel=1e-4, abs=1e-7)


def _collate(dataset, keys):
    from diffalign.data import collate

    return collate([dataset[k] for k in keys])


def test_npo_trains_and_saves_a_lora(tiny_sd_path, pairs, tmp_path):
    final = NPOTrainer(_cfg(NPOTrainer, tiny_sd_path, pairs, tmp_path)).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert records[1]["loss"] != pytest.approx(math.log(2), abs=1e-9)
    weights = load_file(final / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora.up" in k)


def test_npo_config_defaults_and_presets():
    cls = get_trainer("npo")
    assert cls is NPOTrainer and NPOTrainer.swap_pairs and not DPOTrainer.swap_pairs
    cfg = build_config(cls.config_class, {"model": "m", "data": "d"})
    assert (cfg.beta, cfg.lora_rank, cfg.learning_rate) == (1000.0, 8, 5e-6)  # released β 500 (diffusers) × 2
    sd15 = load_config(cls.config_class, "sd15_npo", ["--model", "m", "--data", "d"])
    assert (sd15.beta, sd15.batch_size, sd15.learning_rate, sd15.lr_scheduler) == (1000, 64, 5e-6, "constant")
    sdxl = load_config(cls.config_class, "sdxl_npo", ["--model", "m", "--data", "d"])
    assert sdxl.beta == 2000  # released 2000 and train_sdxl.py keeps the ½: 2000 here (not 4000)
    assert sdxl.batch_size * sdxl.gradient_accumulation_steps == 60
    toy = load_config(cls.config_class, "toy_npo", ["--model", "m", "--data", "d"])
    assert toy.resolution == 32 and toy.lora_rank == 8


def test_cli_lists_npo():
    result = CliRunner().invoke(app, ["train", "npo", "--help"])
    assert result.exit_code == 0
    assert "--beta (1000.0)" in result.output
