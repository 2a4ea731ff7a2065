"""SmPO-Diffusion: the objective against DPO and with equal rewards, the trainer's inversion against the official
per-pair loop, batch size 1 == batch size > 1 per pair, zero gradient for equal scores, and training steps on tiny
SD / SDXL / SD3 models."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from diffalign.data import collate
from diffalign.inversion import ddim_inverse_step
from diffalign.objectives import dpo_loss, smpo_loss, soft_preference
from diffalign.trainers import SmPOTrainer, get_trainer
from diffalign.trainers.sampling import sample_generators
from helpers import png_bytes, read_metrics, tiny_config

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40), (200, 40, 200), (40, 210, 210)]
WORDS = ["red", "green", "blue", "yellow", "pink", "white"]


def _png(colour, size=16) -> bytes:
    return png_bytes(colour, size)


@pytest.fixture(scope="module")
def scored_parquet(tmp_path_factory):
    rows = []
    for i in range(6):
        a, b = i % 6, (i + 2) % 6
        s0, s1 = 20.0 + 0.5 * i, 21.0 - 0.25 * i  # pairs 0-1: jpg_1 wins by the reward, later jpg_0
        rows.append(
            {"caption": f"a {WORDS[a]} square", "jpg_0": _png(COLOURS[a]), "jpg_1": _png(COLOURS[b])}
            | {"label_0": 1.0, "label_1": 0.0, "score_0": s0, "score_1": s1}
        )
    path = tmp_path_factory.mktemp("smpo") / "scored.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _config(model, data, out, **kw):
    values = {"resolution": 16, "batch_size": 3, "beta": 50.0, "tau": 1.0, **kw}
    return tiny_config(SmPOTrainer, model, data, out, **values)


_metrics = read_metrics


# ---- the objective --------------------------------------------------------------------------------------------------
def test_smpo_equals_dpo_when_the_label_factor_is_one():
    m_w = torch.tensor([0.30, 0.52], requires_grad=True)
    m_l = torch.tensor([0.40, 0.50], requires_grad=True)
    r_w, r_l = torch.tensor([0.35, 0.50]), torch.tensor([0.38, 0.49])
    gamma = 10.0
    p = torch.full((2,), 0.5 * (1 + 1 / gamma))  # γ(2p − 1) = 1
    smpo, stats = smpo_loss(m_w, m_l, r_w, r_l, p, beta=100.0, gamma=gamma)
    (g_smpo,) = torch.autograd.grad(smpo, m_w)
    dpo, _ = dpo_loss(m_w, m_l, r_w, r_l, beta=100.0)
    (g_dpo,) = torch.autograd.grad(dpo, m_w)
    assert smpo.item() == pytest.approx(dpo.item(), abs=1e-7)
    assert torch.allclose(g_smpo, g_dpo) and stats["label_factor"].item() == pytest.approx(1.0)
    # by hand: inside = −½·100·((m_w − m_l) − (r_w − r_l)) = 3.5 (pair 1) and −0.5 (pair 2)
    by_hand = -(torch.nn.functional.logsigmoid(torch.tensor([3.5, -0.5]))).mean()
    assert smpo.item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_equal_rewards_give_zero_gradient():
    p = soft_preference(torch.tensor([21.3, 21.3]), torch.tensor([21.3, 20.3]), tau=16.66)
    assert p[0].item() == 0.5 and p[1].item() == pytest.approx(1 / (1 + math.exp(-1 / 16.66)))
    m_w = torch.tensor([0.3, 0.3], requires_grad=True)
    loss, _ = smpo_loss(m_w, torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.4]), torch.tensor([0.4, 0.4]), p, 2000.0)
    (grad,) = torch.autograd.grad(loss, m_w)
    assert grad[0].item() == 0.0 and grad[1].item() > 0  # a lower winner error would lower the loss of pair 2


# ---- the trainer ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(tiny_sd_path, scored_parquet, tmp_path_factory):
    trainer = SmPOTrainer(_config(tiny_sd_path, scored_parquet, tmp_path_factory.mktemp("setup")))
    trainer.setup()
    with torch.no_grad():  # a policy that differs from the reference (LoRA B starts at zero)
        for name, p in trainer._named_trainable():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return trainer


def _batch(trainer, indices):
    return collate([trainer.dataset[i] for i in indices])


def test_dataset_orders_by_reward(trainer):
    items = [trainer.dataset[i] for i in range(6)]
    assert [(it["score_w"], it["score_l"]) for it in items[:2]] == [(21.0, 20.0), (20.75, 20.5)]
    assert all(it["score_w"] > it["score_l"] for it in items)
    assert trainer.dataset.stats["reward_flips"] == 2


def test_inversion_is_the_official_per_pair_loop(trainer):
    """Official code, one pair: for each inverse-grid t below t_s: e0 = ε(z, t); z1 = step(e0); e1 = ε(z1, t);
    z ← step((e0 + e1)/2); then ε̂ = (z − sqrt(ᾱ_ts)·x0)/sqrt(1 − ᾱ_ts)."""
    batch = _batch(trainer, [0, 1, 2])
    x0 = trainer.latents(batch, ("_w", "_l"))
    cond = trainer.condition(batch, trainer.text_embeddings(batch, sample_generators(0, [0, 1, 2])), ("_w", "_l"))
    t = torch.tensor([700, 150, 0] * 2)  # 4, 1 and 0 grid steps (grid 1, 201, 401, 601, 801)
    z, eps, steps = trainer.inverted(x0, cond, t)
    assert steps.tolist() == [4, 1, 0] * 2
    alphas = trainer.backbone.noise_scheduler.alphas_cumprod
    final = alphas[0]  # set_alpha_to_one=False in the tiny SD scheduler: the clean level is ᾱ_0
    for row in range(6):
        zr, c = x0[row : row + 1].clone(), {k: v[row : row + 1] for k, v in cond.items()}
        with torch.no_grad():
            for g in (1, 201, 401, 601, 801):
                if g >= t[row]:
                    break
                a_prev, a_next = (alphas[g - 200] if g > 200 else final), alphas[g]
                e0 = trainer.backbone.predict(zr, torch.tensor([g]), c, denoiser=trainer.denoiser)
                e1 = trainer.backbone.predict(ddim_inverse_step(zr, e0, a_prev, a_next), torch.tensor([g]), c)
                zr = ddim_inverse_step(zr, (e0 + e1) / 2, a_prev, a_next)
        a_t = alphas[t[row]]
        assert torch.allclose(z[row], zr[0], atol=1e-5), row
        assert torch.allclose(eps[row], ((zr - a_t.sqrt() * x0[row]) / (1 - a_t).sqrt())[0], atol=1e-4), row


def test_reference_inversion_uses_the_frozen_model(trainer):
    from diffalign.inversion import invert

    batch = _batch(trainer, [0, 1])
    x0 = trainer.latents(batch, ("_w", "_l"))
    cond = trainer.condition(batch, trainer.text_embeddings(batch, sample_generators(0, [0, 1])), ("_w", "_l"))
    t = torch.tensor([900, 500] * 2)
    policy = trainer.inverted(x0, cond, t)[0]
    trainer.config.inversion_model = "reference"
    try:
        reference = trainer.inverted(x0, cond, t)[0]
    finally:
        trainer.config.inversion_model = "policy"
    trainer.denoiser.disable_adapters()
    try:
        expected = invert(trainer.backbone, x0, cond, trainer.inversion_schedule, renoise=trainer.renoise, stop_at=t)
    finally:
        trainer.denoiser.enable_adapters()
    assert torch.allclose(reference, expected.latents, atol=1e-6)
    assert not torch.allclose(policy, reference, atol=1e-4)


def test_batch_of_one_equals_batch_of_three_per_pair(trainer):
    batch = _batch(trainer, [0, 3, 5])
    together = trainer.pair_terms(batch, sample_generators(0, [0, 1, 2]))

    def pair_loss(terms, i):
        return smpo_loss(*(e[i : i + 1] for e in terms["errors"]), terms["soft_label"][i : i + 1], 50.0)[0]

    steps = together["inversion_steps"][:3].tolist()
    assert len(set(steps)) > 1, steps  # the rows really took different numbers of inversion steps
    for i, index in enumerate([0, 3, 5]):
        alone = trainer.pair_terms(_batch(trainer, [index]), sample_generators(0, [i]))
        # batched matmuls differ from single-row ones in the last fp32 bits; β·γ(2p − 1) = 250 amplifies that, so the
        # loss gets the same relative tolerance as the errors below (abs 1e-5 failed by 1e-8 on a 2-core CPU)
        assert pair_loss(alone, 0).item() == pytest.approx(pair_loss(together, i).item(), rel=1e-4)
        for a, b in zip(alone["errors"], together["errors"]):
            assert a.item() == pytest.approx(b[i].item(), rel=1e-4, abs=1e-7)


def test_equal_scores_give_zero_gradient_in_the_trainer(trainer):
    def grads(batch):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.compute_loss(batch, sample_generators(0, [0, 1]))
        loss.backward()
        return [p.grad.abs().max().item() for _, p in trainer._named_trainable() if p.grad is not None]

    batch = _batch(trainer, [0, 4])
    assert max(grads(batch)) > 1e-6
    batch["score_l"] = batch["score_w"].clone()
    assert max(grads(batch)) == 0.0
    trainer.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backbone,land", [("sd", False), ("sdxl", None), ("sd3", None)])
def test_smpo_lora_steps(backbone, land, request, scored_parquet, tmp_path):
    model = request.getfixturevalue(f"tiny_{backbone}_path")
    trainer = SmPOTrainer(_config(model, scored_parquet, tmp_path, land_on_timestep=land, inversion_steps=4))
    trainer.setup()
    assert trainer.land_on_timestep is (backbone == "sd3")  # None: official for VP, exact landing for flow
    before = {n: p.detach().clone() for n, p in trainer._named_trainable()}
    final = trainer.train()
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert 0.5 < records[0]["soft_label"] < 1 and records[0]["inversion_steps"] >= 0
    assert math.isfinite(records[1]["loss"]) and records[1]["loss"] != pytest.approx(math.log(2), abs=1e-9)
    assert any(not torch.equal(p, before[n]) for n, p in trainer._named_trainable())
    assert (final / "pytorch_lora_weights.safetensors").is_file()


def test_config_and_data_errors(tiny_sd_path, scored_parquet, tmp_path):
    from diffalign.config import ConfigError
    from diffalign.data import DataError

    assert get_trainer("smpo") is SmPOTrainer
    with pytest.raises(ConfigError, match="`tau`"):
        _config(tiny_sd_path, scored_parquet, tmp_path, tau=0)
    bad = SmPOTrainer(_config(tiny_sd_path, scored_parquet, tmp_path, score_columns=["ps_0", "ps_1"]))
    with pytest.raises(DataError, match=r"missing required column\(s\) \['ps_0', 'ps_1'\]"):
        bad.build_dataset()
    with pytest.raises(ValueError, match="`score_columns` must name 2 columns"):
        SmPOTrainer(_config(tiny_sd_path, scored_parquet, tmp_path, score_columns=["a"])).build_dataset()


def test_cli_train_smpo_with_toy_preset(tiny_sd_path, scored_parquet, tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    out = tmp_path / "cli"
    args = ["train", "smpo", "--config", "toy_smpo", "--model", str(tiny_sd_path), "--data", scored_parquet]
    args += ["--output_dir", str(out), "--resolution", "16", "--batch_size", "2", "--max_steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert _metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "--tau" in CliRunner().invoke(app, ["train", "smpo", "--help"]).output
