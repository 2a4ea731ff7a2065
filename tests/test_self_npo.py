"""Self-NPO: the re-noising keeps the forward marginal; grid and truncation indices; the teacher chain; teacher EMA
and its checkpoint; training on every backbone from captions (pure noise) or captioned images; the dense δ of a full
fine-tune plugs into `attach_negative_adapter`."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign.backbones import load_backbone
from diffalign.config import build_config, load_config
from diffalign.trainers import SelfNPOTrainer, get_trainer
from diffalign.trainers.callbacks import Callback
from diffalign.trainers.self_npo import (
    DEFAULT_GUIDANCE,
    renoise,
    resolve_start,
    teacher_chain,
    truncation_grid,
)
from helpers import read_metrics, tiny_config

CAPTIONS = ["a red circle", "a blue square", "a green star on a white background", "a yellow triangle"]


@pytest.fixture(scope="module")
def captions_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n\n")
    return str(path)


@pytest.fixture(scope="module")
def images_parquet(tmp_path_factory):
    rows = []
    for i, caption in enumerate(CAPTIONS):
        img = Image.new("RGB", (20, 20), (60 * i, 200 - 40 * i, 90))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"caption": caption, "image": buf.getvalue()})
    path = tmp_path_factory.mktemp("images") / "images.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.fixture(scope="module")
def sd_backbone(tiny_sd_path):
    return load_backbone(tiny_sd_path)


def _cfg(model, data, out, **kw):
    return tiny_config(SelfNPOTrainer, model, data, out, **{"resolution": 16, "batch_size": 2, **kw})


_metrics = read_metrics


# ---- the formulas -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vp", "flow"])
def test_renoise_keeps_the_forward_marginal(family, sd_backbone):
    """x_t' = α_t'·x0 + σ_t'·ε₁ re-noised to s must be distributed as α_s·x0 + σ_s·ε: check mean and variance."""
    if family == "vp":
        (a_end, a_s), (s_end, s_s) = sd_backbone.alpha_sigma(torch.tensor([200, 700]))
    else:
        (a_end, a_s), (s_end, s_s) = torch.tensor([0.7, 0.1]), torch.tensor([0.3, 0.9])
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = torch.linspace(-1.5, 1.5, 4).repeat(n, 1)  # a known x0: four pixel values, n draws each
    x_end = a_end * x0 + s_end * torch.randn(x0.shape, generator=gen)
    x_s = renoise(
        x_end, a_end.expand(n), s_end.expand(n), a_s.expand(n), s_s.expand(n), torch.randn(x0.shape, generator=gen)
    )
    torch.testing.assert_close(x_s.mean(0), a_s * x0[0], atol=4e-3, rtol=0)
    torch.testing.assert_close(x_s.var(0), (s_s**2).expand(4), atol=4e-3, rtol=1e-2)
    # the paper's form α_s·(x/α_t' + sqrt(nsr_s² − nsr_t'²)·ε) — same numbers
    eps = torch.randn(3, 4, generator=gen)
    nsr = lambda a, s: s / a  # noqa: E731
    by_hand = a_s * (x_end[:3] / a_end + (nsr(a_s, s_s) ** 2 - nsr(a_end, s_end) ** 2).sqrt() * eps)
    torch.testing.assert_close(renoise(x_end[:3], *(v.expand(3) for v in (a_end, s_end, a_s, s_s)), eps), by_hand)


def test_renoise_to_pure_noise_stays_finite():
    x = torch.full((2, 3), 5.0)
    eps = torch.randn(2, 3)
    one, zero, half = torch.ones(2), torch.zeros(2), torch.full((2,), 0.5)
    assert torch.equal(renoise(x, half, half, zero, one, eps), eps)  # flow σ_s = 1: x_s = ε exactly


def test_truncation_grids(sd_backbone, tiny_sd3_path):
    grid = truncation_grid(sd_backbone, 25)
    assert grid.tolist() == [0] + [40 * (k + 1) - 1 for k in range(25)]  # 0, 39, 79, …, 999
    assert grid.dtype == torch.long
    sd3 = load_backbone(tiny_sd3_path)
    flow = truncation_grid(sd3, 4)
    u = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    expect = 1000 * sd3.shift * u / (1 + (sd3.shift - 1) * u)
    torch.testing.assert_close(flow, torch.cat([torch.zeros(1), expect.float()]))
    assert flow[-1] == 1000


def test_teacher_chain_visits_the_truncated_indices(sd_backbone):
    """Rows start at grid indices 7, 3, 24 and stop K = 5 steps lower (index 2, t = 0 after 4 steps, index 19)."""
    grid = truncation_grid(sd_backbone, 25)
    first = torch.tensor([7, 3, 24])
    end = first - 5
    visits = {0: [], 1: [], 2: []}

    def predict(x, t, rows):
        for r, tt in zip(rows.tolist(), t.tolist()):
            visits[r].append(tt)
        return torch.zeros_like(x)  # ε̂ = 0: every DDIM step rescales x by α_prev/α

    x = torch.ones(3, 4, 2, 2)
    x_end, target = teacher_chain(sd_backbone, predict, x, grid, first, end)
    assert visits[0] == [319, 279, 239, 199, 159, 119]  # τ_7 … τ_3, then the target call at t' = τ_2
    assert visits[1] == [159, 119, 79, 39, 0]  # τ_3 … τ_0 (4 steps), then t' = 0
    assert visits[2] == [40 * k - 1 for k in range(25, 20, -1)] + [799]
    alpha = lambda t: sd_backbone.alpha_sigma(torch.tensor([t]))[0]  # noqa: E731
    # with ε̂ = 0: x_end = x·α_t'/α_start, target = x_end/α_t' = x/α_start
    torch.testing.assert_close(x_end[0], x[0] * alpha(119) / alpha(319))
    torch.testing.assert_close(target[1], x[1] / alpha(159))


def test_flow_chain_step_is_the_euler_step(tiny_sd3_path):
    """Rectified flow: the generic step α_prev·x̂0 + σ_prev·ε̂ is exactly Euler x + (σ_prev − σ)·v."""
    sd3 = load_backbone(tiny_sd3_path)
    grid = truncation_grid(sd3, 25)
    v = torch.randn(2, 4, 2, 2)
    x = torch.randn(2, 4, 2, 2)
    first, end = torch.tensor([24, 10]), torch.tensor([23, 9])  # one step each
    x_end, target = teacher_chain(sd3, lambda x_, t, rows: v[rows], x, grid, first, end)
    sigma = grid / 1000
    for i, k in enumerate(first.tolist()):
        torch.testing.assert_close(x_end[i], x[i] + (sigma[k] - sigma[k + 1]) * v[i])
        torch.testing.assert_close(target[i], x_end[i] - sigma[k] * v[i])  # x0 = x − σ·v at t'


def test_guided_teacher_and_defaults(tiny_sd_path, captions_txt, tmp_path):
    assert DEFAULT_GUIDANCE == {"sd": -1.0, "sdxl": -5.0, "sd3": -1.0, "flux": -1.0}
    trainer = SelfNPOTrainer(_cfg(tiny_sd_path, captions_txt, tmp_path, guidance_weight=2.0))
    trainer.setup()
    assert trainer.start == "noise" and trainer.guidance_weight == 2.0
    text = trainer.backbone.encode_prompts(["a red circle"])
    empty = trainer.backbone.encode_prompts([""])
    x, t, rows = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([0])
    with torch.no_grad():
        pred_c = trainer.backbone.predict(x, t, text)
        pred_u = trainer.backbone.predict(x, t, empty)
        guided = trainer.guided_teacher(text, empty)(x, t, rows)
        trainer.guidance_weight = -1.0
        unconditional = trainer.guided_teacher(text, empty)(x, t, rows)
    torch.testing.assert_close(guided, pred_c + 2.0 * (pred_c - pred_u), atol=1e-5, rtol=1e-5)
    assert torch.equal(unconditional, pred_u)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_teacher_unconditional_branch_follows_the_pipeline(family, request, captions_txt, tmp_path):
    """The released SDXL code (Self-NPO/train_xl.py) feeds all-zero prompt and pooled embeddings to pred_u (SDXL's
    `force_zeros_for_empty_prompt`); the SD1.5 code (train.py) encodes "". The teacher gets exactly that."""
    model = request.getfixturevalue(f"tiny_{family}_path")
    trainer = SelfNPOTrainer(_cfg(model, captions_txt, tmp_path, guidance_weight=-5.0))
    trainer.setup()
    seen = []
    original = trainer.guided_teacher
    trainer.guided_teacher = lambda cond, uncond: seen.append(uncond) or original(cond, uncond)
    batch = {"caption": CAPTIONS[:2]}
    trainer.compute_loss(batch, [torch.Generator().manual_seed(i) for i in range(2)])
    (uncond,) = seen
    empty = trainer.backbone.encode_prompts([""])
    text_keys = set(empty)
    if family == "sdxl":
        assert text_keys == {"prompt_embeds", "pooled_prompt_embeds"}
        assert all(uncond[k].shape == (2, *empty[k].shape[1:]) and not uncond[k].any() for k in text_keys)
        assert uncond["time_ids"].shape == (2, 6)  # micro-conditioning kept, as in train_xl.py
    else:
        assert all(torch.equal(uncond[k], empty[k].expand(2, *empty[k].shape[1:])) for k in text_keys)


def test_resolve_start(captions_txt, images_parquet):
    assert resolve_start("auto", captions_txt, "image") == "noise"
    assert resolve_start("auto", images_parquet, "image") == "image"
    assert resolve_start("auto", images_parquet, "picture") == "noise"
    assert resolve_start("image", captions_txt, "image") == "image"


# ---- the trainer --------------------------------------------------------------------------------------------------
class _Recorder(Callback):
    def on_setup(self, trainer):
        self.params = [[p.detach().clone() for p in trainer.params]]

    def on_step_end(self, trainer, step):
        self.params.append([p.detach().clone() for p in trainer.params])


def test_teacher_is_an_ema_of_the_student_and_resumes(tiny_sd_path, images_parquet, tmp_path):
    d = 0.5
    recorder = _Recorder()
    trainer = SelfNPOTrainer(_cfg(tiny_sd_path, images_parquet, tmp_path / "a", teacher_ema_decay=d), [recorder])
    trainer.train()
    th0, th1, th2 = recorder.params
    for i, shadow in enumerate(trainer.teacher.shadow):
        torch.testing.assert_close(shadow, d * d * th0[i] + d * (1 - d) * th1[i] + (1 - d) * th2[i])
    assert any(not torch.equal(a, b) for a, b in zip(th0, th2))
    before = [p.detach().clone() for p in trainer.params]
    with trainer.teacher.swapped():
        assert all(torch.equal(p, s) for p, s in zip(trainer.params, trainer.teacher.shadow))
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before))

    part = tmp_path / "b"
    SelfNPOTrainer(
        _cfg(tiny_sd_path, images_parquet, part, teacher_ema_decay=d, max_steps=1, checkpointing_steps=1)
    ).train()
    assert (part / "checkpoint-1" / "teacher_ema.pt").is_file()
    resumed = SelfNPOTrainer(_cfg(tiny_sd_path, images_parquet, part, teacher_ema_decay=d, resume="latest"))
    resumed.train()
    assert _metrics(part)[1]["loss"] == pytest.approx(_metrics(tmp_path / "a")[1]["loss"], rel=1e-5)
    for a, b in zip(resumed.teacher.shadow, trainer.teacher.shadow):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("family", "start"), [("sd", "noise"), ("sdxl", "image"), ("sd3", "noise"), ("sd3", "image")])
def test_self_npo_trains_on_every_backbone(family, start, request, captions_txt, images_parquet, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}_path")
    data = captions_txt if start == "noise" else images_parquet
    trainer = SelfNPOTrainer(_cfg(model, data, tmp_path, guidance_weight=None))
    trainer.setup()
    assert trainer.start == start and trainer.guidance_weight == DEFAULT_GUIDANCE[family]
    lora_before = [p.detach().clone() for p in trainer.params]
    final = trainer.train()
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(0 <= r["t_end"] < r["t_student"] <= 1000 for r in records)
    assert all(1 <= r["teacher_steps"] <= (25 if start == "noise" else 5) for r in records)
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, lora_before))
    assert load_file(final / "pytorch_lora_weights.safetensors")


def test_full_finetune_writes_a_dense_offset_for_guidance(tiny_sd_path, images_parquet, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.guidance import attach_negative_adapter

    final = SelfNPOTrainer(_cfg(tiny_sd_path, images_parquet, tmp_path, lora_rank=0, learning_rate=1e-4)).train()
    delta = load_file(final / "negative_offset.safetensors")
    tuned = load_file(next((final / "unet").glob("*.safetensors")))
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    name = next(iter(delta))
    torch.testing.assert_close(delta[name], tuned[name] - base.unet.state_dict()[name])
    handle = attach_negative_adapter(base, final, beta=1.0)
    assert len(handle.dense) == len(delta)
    handle.remove()


def test_config_defaults_and_presets():
    cls = get_trainer("self-npo")
    cfg = build_config(cls.config_class, {"model": "m", "data": "d"})
    assert (cfg.lora_rank, cfg.learning_rate, cfg.max_steps, cfg.lr_scheduler) == (0, 1e-6, 1000, "constant")
    assert (cfg.num_grid_steps, cfg.truncation_steps, cfg.teacher_ema_decay, cfg.huber_c) == (25, 5, 0.999, 1e-3)
    sd15 = load_config(cls.config_class, "sd15_self_npo", ["--model", "m", "--data", "d"])
    assert (sd15.learning_rate, sd15.batch_size, sd15.guidance_weight, sd15.adam_weight_decay) == (1e-6, 20, -1, 1e-3)
    sdxl = load_config(cls.config_class, "sdxl_self_npo", ["--model", "m", "--data", "d"])
    assert (sdxl.learning_rate, sdxl.batch_size, sdxl.guidance_weight, sdxl.adam_weight_decay) == (1e-7, 10, -5, 0)
    toy = load_config(cls.config_class, "toy_self_npo", ["--model", "m", "--data", "d"])
    assert toy.resolution == 32
