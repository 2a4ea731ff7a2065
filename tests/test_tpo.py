"""TDPO / TKTO on tiny in-test models: data straight from `perturb_dataset`, values at step 0, identical captions give
no signal, both halves of an item come from one image with one t and ε, every backbone, LoRA and full."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from diffalign.config import ConfigError
from diffalign.objectives import bound_negative_error, dpo_loss
from diffalign.perturb import RulePerturber, perturb_dataset
from diffalign.trainers import TDPOTrainer, TKTOTrainer, get_trainer
from helpers import read_metrics, tiny_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square")
TINY_VOCAB = "a red blue green yellow pink white black circle square triangle star on background".split()


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned")
    lines = []
    for i, (word, colour) in enumerate(COLOURS.items()):
        for j, shape in enumerate(SHAPES):
            img = Image.new("RGB", (20, 20), (255, 255, 255))
            img.paste(colour, (2 + 4 * j, 3, 14 + 4 * j, 15))
            name = f"{i}_{j}.png"
            img.save(root / name)
            lines.append({"file_name": name, "caption": f"a {word} {shape} on a white background"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture(scope="module")
def tpo_jsonl(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tpo") / "tpo.jsonl"
    stats = perturb_dataset(imagefolder, out, RulePerturber(vocabulary=TINY_VOCAB), seed=0)
    assert stats["written"] == 8
    return str(out)


@pytest.fixture(scope="module")
def same_caption_jsonl(tpo_jsonl, tmp_path_factory):
    """The TPO data with c_l := c_w (no preference signal)."""
    out = tmp_path_factory.mktemp("same") / "same.jsonl"
    rows = [json.loads(line) for line in open(tpo_jsonl)]
    out.write_text("".join(json.dumps({**r, "mismatched_caption": r["caption"]}) + "\n" for r in rows))
    return str(out)


def _config(cls, model, data, out, **kw):
    return tiny_config(cls, model, data, out, **{"resolution": 16, "batch_size": 2, "beta": 50.0, **kw})


_metrics = read_metrics


def _batch(trainer, n=2):
    from diffalign.data import collate

    return collate([trainer.dataset[i] for i in range(n)])


def _randomise_lora(trainer):
    """Policy ≠ reference: give every LoRA matrix random values."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in trainer._named_trainable():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("method", ["tdpo", "tkto"])
@pytest.mark.parametrize("backbone", ["sd", "sdxl", "sd3"])
def test_tpo_lora_steps_every_backbone(method, backbone, request, tpo_jsonl, tmp_path):
    cls = get_trainer(method)
    model = request.getfixturevalue(f"tiny_{backbone}_path")
    trainer = cls(_config(cls, model, tpo_jsonl, tmp_path))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer._named_trainable()}
    final = trainer.train()
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    # step 1: LoRA B = 0, policy == reference: DPO's log 2, KTO's mean(1 − σ(0)) = ½
    assert records[0]["loss"] == pytest.approx(math.log(2) if method == "tdpo" else 0.5, abs=1e-6)
    assert math.isfinite(records[1]["loss"]) and records[1]["loss"] != records[0]["loss"]
    assert any(not torch.equal(p, before[n]) for n, p in trainer._named_trainable())
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    if method == "tkto":
        assert records[0]["frac_desirable"] == 0.5


@pytest.mark.parametrize("method", ["tdpo", "tkto"])
def test_tpo_full_finetune(method, tiny_sd_path, tpo_jsonl, tmp_path):
    cls = get_trainer(method)
    trainer = cls(_config(cls, tiny_sd_path, tpo_jsonl, tmp_path, lora_rank=0, learning_rate=1e-4))
    final = trainer.train()
    assert trainer.ref_copy is not None
    # the frozen copy runs in eval mode and the policy in train mode: attention takes another kernel path, which moves
    # outputs by ~1e-6, so step 0 is log 2 / ½ only to ~1e-5 here (exact with LoRA, where both are the same module)
    assert _metrics(tmp_path)[0]["loss"] == pytest.approx(math.log(2) if method == "tdpo" else 0.5, abs=1e-4)
    assert (final / "unet" / "config.json").is_file()


@pytest.mark.parametrize("method, value", [("tdpo", math.log(2)), ("tkto", 0.5)])
def test_identical_captions_give_constant_loss_and_zero_gradient(
    method, value, tiny_sd_path, same_caption_jsonl, tpo_jsonl, tmp_path
):
    cls = get_trainer(method)
    grads = {}
    for name, data in (("same", same_caption_jsonl), ("perturbed", tpo_jsonl)):
        trainer = cls(_config(cls, tiny_sd_path, data, tmp_path / name, beta=5000.0))
        trainer.setup()
        _randomise_lora(trainer)  # the policy differs from the reference, so only the captions can cancel
        loss, stats = trainer.compute_loss(_batch(trainer), _generators(2))
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for _, p in trainer._named_trainable()])
        if name == "same":
            assert loss.item() == pytest.approx(value, abs=1e-6)
    # the two rows' gradients cancel up to float rounding in the weight-gradient sums (TDPO: ~3e-7 of a real
    # gradient; TKTO also rounds σ'(z) vs σ'(−z): ~2e-5)
    tolerance = 1e-5 if method == "tdpo" else 1e-4
    assert grads["same"].abs().max() <= tolerance * grads["perturbed"].abs().max()
    assert grads["perturbed"].abs().max() > 0


def test_tdpo_matches_dpo_loss_by_hand(tiny_sd_path, tpo_jsonl, tmp_path):
    """The winner row is (x, c_w), the loser (x, c_l), with the same x_t, t and target; checked against a manual
    recomputation through the backbone."""
    trainer = TDPOTrainer(_config(TDPOTrainer, tiny_sd_path, tpo_jsonl, tmp_path, beta=5000.0))
    trainer.setup()
    _randomise_lora(trainer)
    batch = _batch(trainer)
    with torch.no_grad():
        loss, stats = trainer.compute_loss(batch, _generators(2))
        bb = trainer.backbone
        x0 = bb.encode_images(batch["pixels"])
        gens = _generators(2)
        t = torch.cat([bb.sample_timesteps(1, generator=g) for g in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        x_t, target = bb.add_noise(x0, eps, t), bb.training_target(x0, eps, t)

        def err(captions, reference):
            cond = bb.build_condition(bb.encode_prompts(captions))
            with trainer.reference() if reference else torch.enable_grad():
                pred = bb.predict(x_t, t, cond, denoiser=trainer.denoiser)
            return ((pred - target) ** 2).mean(dim=(1, 2, 3))

        m_w, m_l = err(batch["caption"], False), err(batch["mismatched_caption"], False)
        r_w, r_l = err(batch["caption"], True), err(batch["mismatched_caption"], True)
    inside = -0.5 * 5000.0 * ((m_w - m_l) - (r_w - r_l))
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(-inside).mean().item(), rel=1e-4)
    assert not torch.equal(m_w, m_l)


@pytest.mark.parametrize("shared", [True, False])
def test_tkto_halves_come_from_the_same_image(shared, tiny_sd_path, tpo_jsonl, tmp_path):
    trainer = TKTOTrainer(_config(TKTOTrainer, tiny_sd_path, tpo_jsonl, tmp_path, shared_noise=shared))
    trainer.setup()
    seen = {}
    add_noise = trainer.backbone.add_noise

    def spy(x0, eps, t):
        seen.update(x0=x0, eps=eps, t=t)
        return add_noise(x0, eps, t)

    trainer.backbone.add_noise = spy
    batch = _batch(trainer)
    trainer.compute_loss(batch, _generators(2))
    x0, eps, t = seen["x0"], seen["eps"], seen["t"]
    assert x0.shape[0] == 4 and torch.equal(x0[:2], x0[2:])  # same image latent in both halves
    assert torch.equal(x0[:2], trainer.backbone.encode_images(batch["pixels"]))
    assert torch.equal(eps[:2], eps[2:]) == shared and torch.equal(t[:2], t[2:]) == shared
    cond = trainer.caption_pair_condition(batch)
    expected = trainer.backbone.encode_prompts(list(batch["caption"]) + list(batch["mismatched_caption"]))
    assert torch.equal(cond["prompt_embeds"], expected["prompt_embeds"])  # desirable rows under c_w first
    assert batch["caption"] != batch["mismatched_caption"]


def test_caption_dropout_is_refused(tiny_sd_path, tpo_jsonl, tmp_path):
    for cls in (TDPOTrainer, TKTOTrainer):
        with pytest.raises(ConfigError, match="`proportion_empty_prompts` must be 0 for TPO, got 0.2"):
            _config(cls, tiny_sd_path, tpo_jsonl, tmp_path, proportion_empty_prompts=0.2)


def test_tdpo_cached_latents_match_uncached(tiny_sd_path, tpo_jsonl, tmp_path):
    """With `cache_latents` the matched caption comes from the cache and the mismatched one is encoded on the fly."""
    losses = {}
    for cache in (False, True):
        out = tmp_path / f"cache{cache}"
        TDPOTrainer(_config(TDPOTrainer, tiny_sd_path, tpo_jsonl, out, cache_latents=cache)).train()
        losses[cache] = [r["loss"] for r in _metrics(out)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# ---- the optional bound on the perturbed-caption term ---------------------------------------------------------------
def test_negative_clip_exact_values():
    """m̃ = min(m, (1 + c)·r): active on rows whose policy error grew more than c·r above the reference's, with no
    gradient there; the identity (gradient 1) everywhere else."""
    m = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    r = torch.tensor([1.0, 1.5, 2.0])
    bounded, stats = bound_negative_error(m, r, 0.2)  # caps 1.2, 1.8, 2.4
    assert bounded.tolist() == pytest.approx([1.0, 1.8, 2.4])
    bounded.sum().backward()
    assert m.grad.tolist() == [1.0, 0.0, 0.0]
    assert stats["negative_clipped"].item() == pytest.approx(2 / 3)
    assert stats["negative_excess"].item() == pytest.approx((0 + 0.5 / 1.5 + 1.0 / 2.0) / 3)  # before the bound
    loose, stats = bound_negative_error(m, r, 1.0)  # caps 2, 3, 4: the term has not grown that far, inactive
    assert torch.equal(loose, m) and stats["negative_clipped"].item() == 0
    off, stats = bound_negative_error(m, r, None)
    assert off is m and stats["negative_clipped"].item() == 0
    # TKTO: only the undesirable (negative) rows are bounded
    mask = torch.tensor([True, False, False])
    assert bound_negative_error(m, r, 0.2, negative=mask)[0].tolist() == pytest.approx([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="`bound` must be >= 0 or None, got -0.1"):
        bound_negative_error(m, r, -0.1)


def test_negative_clip_in_the_tdpo_loss_by_hand():
    """One pair, β = 1: m_w = r_w = 1, r_l = 2, m_l = 3 (the loser error grew by half). Unbounded:
    inside = −½((1 − 3) − (1 − 2)) = 0.5; with c = 0.2, m̃_l = 2.4: inside = 0.2, and the loser gives no gradient."""
    m_w, r_w, r_l = torch.tensor([1.0], requires_grad=True), torch.tensor([1.0]), torch.tensor([2.0])
    m_l = torch.tensor([3.0], requires_grad=True)
    loss, _ = dpo_loss(m_w, m_l, r_w, r_l, 1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    bounded, _ = bound_negative_error(m_l, r_l, 0.2)
    loss, _ = dpo_loss(m_w, bounded, r_w, r_l, 1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    loss.backward()
    assert m_l.grad.item() == 0 and m_w.grad.item() == pytest.approx(0.5 * (1 - 1 / (1 + math.exp(-0.2))), abs=1e-6)


@pytest.mark.parametrize("method", ["tdpo", "tkto"])
def test_negative_clip_in_the_trainers(method, tiny_sd_path, tpo_jsonl, tmp_path):
    """A bound no row reaches leaves the loss bit-identical; c = 0 bounds every negative row whose policy error is
    above the reference's, which changes the loss."""
    cls = get_trainer(method)
    results = {}
    for clip in (None, 1e6, 0.0):
        trainer = cls(_config(cls, tiny_sd_path, tpo_jsonl, tmp_path / str(clip), beta=5000.0, negative_clip=clip))
        trainer.setup()
        _randomise_lora(trainer)
        with torch.no_grad():
            results[clip] = trainer.compute_loss(_batch(trainer), _generators(2))
    assert results[1e6][0].item() == results[None][0].item()
    assert results[1e6][1]["negative_clipped"].item() == 0
    assert results[0.0][1]["negative_clipped"].item() > 0
    assert results[0.0][0].item() != results[None][0].item()
    with pytest.raises(ConfigError, match="negative_clip"):
        _config(cls, tiny_sd_path, tpo_jsonl, tmp_path, negative_clip=-1.0)
