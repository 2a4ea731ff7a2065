"""The KTO weighted sampler (`desirable_ratio`, the official Diffusion-KTO `--positive_ratio`): its law against the
official WeightedRandomSampler weights, determinism per stream position (resume, batch layouts), the plain sampler
left unchanged, and a tiny KTO run that uses it."""

from __future__ import annotations

import io
import math
from collections import Counter

import pandas as pd
import pytest
import torch
from PIL import Image

import scale_cases
from diffalign.config import ConfigError
from diffalign.trainers import KTOTrainer
from diffalign.trainers.sampling import StepBatchSampler, WeightedStepBatchSampler, epoch_permutation
from helpers import read_metrics, tiny_config

# 3 desirable of 10: the weighted draw must move the fraction far from the data's 0.3
FLAGS = [True, False, False, True, False, False, False, True, False, False]


def _keys(sampler, steps: int) -> list[tuple[int, int]]:
    it = iter(sampler)
    return [key for _ in range(steps) for key in next(it)]


def _official_item_probabilities(flags: list[bool], p: float) -> torch.Tensor:
    """What diffusion-kto's `make_weights_for_balanced_classes` + `WeightedRandomSampler(weights, len(weights))`
    draw per item (written here from its math): class weight N / count · ratio, normalised over the items."""
    n, n_pos = len(flags), sum(flags)
    weight = torch.tensor([n / n_pos * p if f else n / (n - n_pos) * (1 - p) for f in flags], dtype=torch.float64)
    return weight / weight.sum()


def test_weighted_draw_matches_the_official_sampler_law():
    """Over 40 000 positions: the desirable fraction is p = 0.8 within 0.01 (binomial sd 0.002, so 5 sd), and each
    item's frequency is the official sampler's probability within 0.01 (absolute)."""
    sampler = WeightedStepBatchSampler(FLAGS, 0.8, batch_size=8, seed=3)
    keys = _keys(sampler, 5000)
    indices = [i for _, i in keys]
    desirable_fraction = sum(FLAGS[i] for i in indices) / len(indices)
    assert desirable_fraction == pytest.approx(0.8, abs=0.01)
    counts = Counter(indices)
    frequency = torch.tensor([counts[i] / len(indices) for i in range(len(FLAGS))], dtype=torch.float64)
    expected = _official_item_probabilities(FLAGS, 0.8)
    torch.testing.assert_close(expected[0], torch.tensor(0.8 / 3, dtype=torch.float64))  # p / N_D
    torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)
    assert [e for e, _ in keys[:10]] == [0] * 10 and keys[10][0] == 1  # epoch = position // N (crop/flip seed)


def test_each_position_has_one_key_whatever_the_layout():
    """Same key per stream position: a batch of 4, 2 processes × 2, and a resume at micro-step 3 agree."""
    one = _keys(WeightedStepBatchSampler(FLAGS, 0.8, batch_size=4, seed=1), 6)
    rank0 = _keys(WeightedStepBatchSampler(FLAGS, 0.8, batch_size=2, seed=1, num_processes=2, process_index=0), 6)
    rank1 = _keys(WeightedStepBatchSampler(FLAGS, 0.8, batch_size=2, seed=1, num_processes=2, process_index=1), 6)
    interleaved = [k for step in range(6) for k in rank0[2 * step : 2 * step + 2] + rank1[2 * step : 2 * step + 2]]
    assert interleaved == one
    resumed = _keys(WeightedStepBatchSampler(FLAGS, 0.8, batch_size=4, seed=1, start=3), 3)
    assert resumed == one[12:]
    again = _keys(WeightedStepBatchSampler(FLAGS, 0.8, batch_size=4, seed=1), 6)
    assert again == one
    other_seed = _keys(WeightedStepBatchSampler(FLAGS, 0.8, batch_size=4, seed=2), 6)
    assert other_seed != one


def test_plain_sampler_is_unchanged():
    """StepBatchSampler still walks the per-epoch permutations (the weighted one is an addition)."""
    keys = _keys(StepBatchSampler(10, batch_size=4, seed=5), 5)
    expected = [(e, int(i)) for e in range(2) for i in epoch_permutation(10, 5, e)]
    assert keys == expected


def test_weighted_sampler_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"`desirable_ratio` must be in \(0, 1\)"):
        WeightedStepBatchSampler(FLAGS, 1.0, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="needs both kinds of samples; the data has 0 desirable and 2 undesirable"):
        WeightedStepBatchSampler([False, False], 0.5, batch_size=2, seed=0)


# ---- in the trainer ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def per_image_table(tmp_path_factory):
    """Per-image labels (the official data's shape): 2 desirable, 6 undesirable images."""
    rows = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), (30 * i, 200 - 20 * i, 90)).save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "caption": f"shape {i}", "desirable": i in (2, 5)})
    path = tmp_path_factory.mktemp("kto") / "images.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _cfg(model, data, out, **kw):
    return tiny_config(KTOTrainer, model, data, out, **{"resolution": 32, "batch_size": 4, "beta": 50.0, **kw})


def test_kto_trains_with_the_weighted_sampler(tiny_sd_path, per_image_table, tmp_path, monkeypatch):
    built = []

    class Recording(WeightedStepBatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr("diffalign.trainers.kto.WeightedStepBatchSampler", Recording)
    cfg = _cfg(tiny_sd_path, per_image_table, tmp_path, desirable_ratio=0.8, max_steps=3, learning_rate=1e-4)
    KTOTrainer(cfg).train()
    (sampler,) = built
    assert sampler.desirable_ratio == 0.8 and [len(c) for c in sampler.classes] == [6, 2]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    # the batches are the sampler's: its first 12 draws, in order, with the data's flags
    drawn = _keys(WeightedStepBatchSampler(sampler_flags(per_image_table), 0.8, batch_size=4, seed=cfg.seed), 3)
    fractions = [sum(sampler_flags(per_image_table)[i] for _, i in drawn[4 * s : 4 * s + 4]) / 4 for s in range(3)]
    assert [r["frac_desirable"] for r in records] == pytest.approx(fractions)
    assert sum(fractions) / 3 > 0.25  # the data alone is 2/8 desirable


def sampler_flags(table: str) -> list[bool]:
    return list(pd.read_parquet(table)["desirable"])


def test_weighted_kto_batch_equals_accumulation(tiny_sd_path, per_image_table, tmp_path):
    """1 × 4 and 2 × 2 see the same draws and make the same update with the sampler on."""
    scale_cases.run("kto", tiny_sd_path, per_image_table, tmp_path / "b4", batch_size=4, ga=1, desirable_ratio=0.8)
    scale_cases.run("kto", tiny_sd_path, per_image_table, tmp_path / "b2", batch_size=2, ga=2, desirable_ratio=0.8)
    a, b = scale_cases.trained(tmp_path / "b4"), scale_cases.trained(tmp_path / "b2")
    assert max(v.abs().max().item() for v in a.values()) > 1e-4
    assert scale_cases.max_relative_difference(a, b) <= scale_cases.REL_TOL


def test_desirable_ratio_needs_per_image_flags(tiny_sd_path, per_image_table, tmp_path):
    trainer = KTOTrainer(_cfg(tiny_sd_path, per_image_table, tmp_path, desirable_ratio=0.8))
    trainer.setup()
    trainer.dataset = list(range(4))  # e.g. a dataset class without `desirable_flags`
    with pytest.raises(ConfigError, match="needs a dataset with per-image desirable flags, got list"):
        trainer.make_sampler(0)
