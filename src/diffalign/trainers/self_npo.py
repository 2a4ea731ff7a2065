"""Self-NPO: negative preference weights from the model's own truncated sampling chains — no labels, no reward model
(Wang et al. 2025, "Self-NPO: Negative Preference Optimization of Diffusion Models by Simply Learning from Itself
without Explicit Preference Annotations"; "truncated diffusion fine-tuning").

Per sample, with a caption c and either an image latent z0 or pure noise (notation of `backbones.base`:
x_t = α_t·x0 + σ_t·ε, nsr_t = σ_t / α_t):

1. start: pick k ~ U{0..N−1} on an N-step grid τ_0 < … < τ_{N−1} (N = 25; τ_{−1} = 0). With an image, x = α·z0 + σ·ε
   at τ_k. With pure noise, x = ε at the top of the grid and the teacher first samples its own way down to τ_k.
2. teacher chain (θ̄ = EMA of the student, no grad): K DDIM steps (K = 5) τ_k → τ_{k−K}, i.e. down to
   t' = τ_max(k−K, −1), each with the guided prediction `pred_c + w·(pred_c − pred_u)`; w = −1 (SD1.5: purely
   unconditional), w = −5 (SDXL: guided AWAY from the prompt). pred_u takes the backbone's
   `unconditional_embeddings()`: all zeros for SDXL (the pipeline's `force_zeros_for_empty_prompt`, as the released
   SDXL code), the encoded "" for SD1.5 and SD3. DDIM step: x_prev = α_prev·x̂0 + σ_prev·ε̂, which for rectified
   flow (α = 1 − σ) is exactly the Euler step x + (σ_prev − σ)·v.
3. target = the teacher's guided x0 estimate at (x_t', t').
4. re-noise FROM x_t' to s > t':  x_s = α_s·(x_t'/α_t' + sqrt(nsr_s² − nsr_t'²)·ε'), written as
   (α_s/α_t')·x_t' + sqrt(σ_s² − α_s²·nsr_t'²)·ε' so σ_s → 1 (flow) stays finite. If x_t' ~ N(α_t'·x0, σ_t'²) then
   x_s ~ N(α_s·x0, σ_s²): the forward marginal is kept (`renoise`).
5. the student (conditioned on c) predicts at (x_s, s) → x0_θ; loss = pseudo-Huber(x0_θ, target), c = 1e-3.

The teacher follows the student by EMA 0.999 per optimizer step (`TeacherEMACallback`, saved in checkpoints). The
result δ = θ − θ_base goes into the CFG unconditional branch (`diffalign.guidance.attach_negative_adapter`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from diffalign.backbones.base import unwrap
from diffalign.config import TrainConfig
from diffalign.data import CaptionedImages, Captions, load_table
from diffalign.objectives import pseudo_huber
from diffalign.trainers.base import Trainer
from diffalign.trainers.callbacks import Callback

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = {"sd": -1.0, "sdxl": -5.0, "sd3": -1.0, "flux": -1.0}
"""Teacher guidance weight w per family: SD1.5 −1 and SDXL −5 are the released recipes; SD3 and FLUX.1-schnell have no
released recipe and use the SD1.5 choice (purely unconditional teacher). Guidance-distilled FLUX.1-dev is refused."""

CAPTION_SUFFIXES = (".txt", ".json")


class SelfNPOConfig(TrainConfig):
    """Self-NPO (truncated diffusion fine-tuning). Released recipes: full UNet, lr 1e-6 (SD1.5, weight decay 1e-3) /
    1e-7 (SDXL, weight decay 0), batch 20 / 10, 1000 steps, 8-bit AdamW, grad clip 1, constant LR, fp16.
    `beta` is not used by this method (no KL term)."""

    lora_rank: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tune (the released recipes).")
    learning_rate: float = Field(1e-6, gt=0, description="Released: 1e-6 (SD1.5), 1e-7 (SDXL).")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    max_steps: int = Field(1000, ge=1, description="Optimizer steps (released: 1000).")
    guidance_weight: float | None = Field(
        None, description="Teacher guidance w in pred_c + w·(pred_c − pred_u); None → −1 (SD, SD3), −5 (SDXL)."
    )
    num_grid_steps: int = Field(25, ge=2, description="N, steps of the DDIM grid the chain runs on.")
    truncation_steps: int = Field(5, ge=1, description="K, teacher DDIM steps per sample.")
    teacher_ema_decay: float = Field(0.999, gt=0, lt=1, description="Teacher θ̄ ← d·θ̄ + (1 − d)·θ per step.")
    huber_c: float = Field(1e-3, gt=0, description="c of the pseudo-Huber loss.")
    start: Literal["auto", "image", "noise"] = Field(
        "auto",
        description="Chain start: `image` (captioned images, forward-noised), `noise` (a caption list, pure noise), "
        "`auto` (images when `data` has `image_column`).",
    )
    image_column: str = Field("image", description="Image column of a captioned-image table.")


class TeacherEMACallback(Callback):
    """The Self-NPO teacher θ̄: an fp32 EMA of the trainable weights, θ̄ ← d·θ̄ + (1 − d)·θ after every optimizer
    step, starting from the weights at set-up (= the base, or the zero-initialised LoRA on top of it). The teacher
    runs on the SAME network with θ̄ swapped in (`swapped`), so no second copy of the denoiser is kept besides θ̄
    (LoRA: θ̄ is LoRA-sized). Saved as `teacher_ema.pt` in checkpoints and restored on resume."""

    def __init__(self, decay: float):
        self.decay = decay

    def on_setup(self, trainer: Trainer) -> None:
        self.params = trainer.params
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def on_step_end(self, trainer: Trainer, step: int) -> None:
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, [p.detach().float() for p in self.params], alpha=1 - self.decay)

    def on_save(self, trainer: Trainer, checkpoint_dir: Path) -> None:
        torch.save([t.cpu() for t in self.shadow], Path(checkpoint_dir) / "teacher_ema.pt")

    def on_resume(self, trainer: Trainer, checkpoint_dir: Path) -> None:
        loaded = torch.load(Path(checkpoint_dir) / "teacher_ema.pt", weights_only=True)
        self.shadow = [t.to(p.device, torch.float32) for t, p in zip(loaded, self.params)]

    @contextmanager
    def swapped(self):
        """Inside: the trainable parameters hold θ̄ (a pointer swap, no copy)."""
        saved = [p.data for p in self.params]
        for p, t in zip(self.params, self.shadow):
            p.data = t if t.dtype == p.dtype else t.to(p.dtype)
        try:
            yield
        finally:
            for p, data in zip(self.params, saved):
                p.data = data


class SelfNPOTrainer(Trainer):
    """Self-NPO: the student learns the teacher's (negatively guided) x0 estimate at the end of a K-step truncated
    chain, from a re-noised point further up the trajectory. Inputs: a caption list (pure-noise start) or captioned
    images; no labels, no reward model. Outputs like every trainer; a full fine-tune also writes
    `final/negative_offset.safetensors` = θ − θ_base for `attach_negative_adapter`."""

    method = "self-npo"
    config_class = SelfNPOConfig

    def setup(self) -> None:
        super().setup()
        self.backbone.check_cfg_branch("`train self-npo` (a CFG-guided teacher; δ goes into the unconditional branch)")
        self.ref_copy = None  # Self-NPO has no reference term; the teacher is the EMA below
        self.teacher = TeacherEMACallback(self.config.teacher_ema_decay)
        self.teacher.on_setup(self)
        self.callbacks.append(self.teacher)
        w = self.config.guidance_weight
        self.guidance_weight = DEFAULT_GUIDANCE[self.backbone.family] if w is None else w
        self.grid = truncation_grid(self.backbone, self.config.num_grid_steps).to(self.accelerator.device)
        # the teacher's pred_u takes the pipeline's own unconditional input: zeros for SDXL
        # (force_zeros_for_empty_prompt, as the released train_xl.py), the encoded "" for SD1.5 (as train.py) and SD3
        self.uncond_text = self.backbone.unconditional_embeddings()
        logger.info("self-npo: start=%s, teacher w=%g, grid %s", self.start, self.guidance_weight, self.grid.tolist())

    def build_dataset(self):
        cfg = self.config
        self.start = resolve_start(cfg.start, cfg.data, cfg.image_column)
        if self.start == "noise":
            return Captions(cfg.data, caption_column=cfg.caption_column)
        return CaptionedImages(
            cfg.data,
            resolution=cfg.resolution,
            center_crop=cfg.center_crop,
            random_flip=cfg.random_flip,
            seed=cfg.seed,
            caption_column=cfg.caption_column,
            image_column=cfg.image_column,
        )

    def compute_loss(self, batch: dict, generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        cfg, n = self.config, len(generators)
        cond = self.condition(batch, self.text_embeddings(batch, generators))
        uncond = self.condition(batch, {k: v.expand(n, *v.shape[1:]) for k, v in self.uncond_text.items()})
        k = torch.cat([torch.randint(0, cfg.num_grid_steps, (1,), generator=g) for g in generators])
        end = k - cfg.truncation_steps  # grid index of t' (−1 … means t' = 0)
        x, first = self.chain_start(batch, generators, k)
        with torch.no_grad(), self.accelerator.autocast(), self.teacher.swapped():
            predict = self.guided_teacher(cond, uncond)
            x_end, target = teacher_chain(self.backbone, predict, x, self.grid, first, end)
        t_end = self.grid[(end + 1).clamp(min=0).to(self.grid.device)]
        t_s = self.student_timesteps(t_end, generators)
        a_end, s_end = self.backbone.alpha_sigma(t_end)
        a_s, s_s = self.backbone.alpha_sigma(t_s)
        x_s = renoise(x_end, a_end, s_end, a_s, s_s, self.noise(x_end, generators))
        pred = self.backbone.predict(x_s, t_s, cond, denoiser=self.model)
        x0, _ = self.backbone.pred_to_x0_eps(x_s, pred, t_s)
        loss = pseudo_huber(x0, target, cfg.huber_c)
        stats = {
            "x0_mse": (x0.detach() - target).pow(2).mean(),
            "t_end": t_end.float().mean(),
            "t_student": t_s.float().mean(),
            "teacher_steps": (first - end.clamp(min=-1)).float().mean(),
        }
        return loss, stats

    def chain_start(self, batch: dict, generators: list[torch.Generator], k: torch.Tensor):
        """x at the chain's first grid index: the image forward-noised to τ_k, or pure noise at the top index."""
        if self.start == "image":
            x0 = self.latents(batch)
            t = self.grid[(k + 1).to(self.grid.device)]
            return self.backbone.add_noise(x0, self.noise(x0, generators), t), k
        side = self.config.resolution // self.backbone.vae_scale_factor
        like = torch.empty(len(generators), self.backbone.latent_channels, side, side, device=self.accelerator.device)
        return self.noise(like, generators), torch.full_like(k, self.config.num_grid_steps - 1)

    def guided_teacher(self, cond: dict, uncond: dict):
        """`(x, t) → pred_c + w·(pred_c − pred_u)` of the denoiser (θ̄ swapped in by the caller); w = −1 needs only
        the unconditional call, w = 0 only the conditional one."""
        w, denoiser, backbone = self.guidance_weight, unwrap(self.denoiser), self.backbone

        def predict(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            c = {key: v[rows] for key, v in cond.items()}
            u = {key: v[rows] for key, v in uncond.items()}
            if w == -1:
                return backbone.predict(x, t, u, denoiser=denoiser)
            if w == 0:
                return backbone.predict(x, t, c, denoiser=denoiser)
            both = {key: torch.cat([u[key], c[key]]) for key in c}
            pred_u, pred_c = backbone.predict(x.repeat(2, 1, 1, 1), t.repeat(2), both, denoiser=denoiser).chunk(2)
            return pred_c + w * (pred_c - pred_u)

        return predict

    def student_timesteps(self, t_end: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """s > t': uniform on {t'+1, …, T−1} (DDPM), or σ_s uniform on (σ_t', 1) for rectified flow."""
        T = self.backbone.num_train_timesteps
        u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(t_end.device)
        if self.backbone.prediction_type == "flow_matching":
            return t_end.float() + u * (T - t_end.float())
        low = t_end.long() + 1
        return (low + (u * (T - low).float()).long().clamp(max=T - 1 - low)).long()

    def save_final(self) -> Path:
        """Also write `negative_offset.safetensors` = θ − θ_base for a full fine-tune (read from the saved weights
        and the base model's folder), so `attach_negative_adapter(pipe, final)` works without a second network."""
        final = super().save_final()
        if self.config.lora_rank == 0 and self.accelerator.is_main_process:
            cls = type(unwrap(self.denoiser))
            write_negative_offset(final, self.config.model, self.backbone.denoiser_subfolder, cls)
        return final


# ---- the pieces, as functions (tested on their own) ---------------------------------------------------------------
def resolve_start(start: str, data: str, image_column: str) -> str:
    """`"image"` or `"noise"`; `"auto"` reads the table's columns (caption files → noise)."""
    if start != "auto":
        return start
    if Path(data).suffix.lower() in CAPTION_SUFFIXES:
        return "noise"
    return "image" if image_column in load_table(data).column_names else "noise"


def truncation_grid(backbone, num_steps: int) -> torch.Tensor:
    """`[N + 1]` timesteps: index 0 is the chain's floor t = 0, index k + 1 is τ_k.

    DDPM (SD, SDXL): τ_k = (k + 1)·T/N − 1 (the released code's "trailing" DDIM grid: 39, 79, …, 999 for T = 1000,
    N = 25). Rectified flow (SD3): σ_k = shift·u/(1 + (shift − 1)·u) with u = (k + 1)/N — the pipeline's shifted
    sampling grid — and t = σ·T.
    """
    T = backbone.num_train_timesteps
    u = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    if backbone.prediction_type == "flow_matching":
        shift = float(getattr(backbone, "shift", 1.0))
        sigma = shift * u / (1 + (shift - 1) * u)
        return torch.cat([torch.zeros(1), (sigma * T).float()])
    return torch.cat([torch.zeros(1, dtype=torch.long), (u * T).round().long() - 1])


def teacher_chain(backbone, predict, x: torch.Tensor, grid: torch.Tensor, first: torch.Tensor, end: torch.Tensor):
    """Run DDIM steps from grid index `first` down to `end` (per row; −1 = t 0) and return `(x_end, x0_target)`.

    Each step at index i: `pred = predict(x, τ_i)` → (x̂0, ε̂) → x ← α_{i−1}·x̂0 + σ_{i−1}·ε̂ (index −1 = t 0). Only
    rows still above their `end` are evaluated. The target is the x0 estimate of one more `predict` at (x_end, t').
    `predict(x, t, rows)` gets the row indices so it can pick their conditioning.
    """
    x = x.clone()
    cur, end = first.clone().to(x.device), end.to(x.device)
    while True:
        rows = torch.nonzero(cur > end.clamp(min=-1)).flatten()
        if rows.numel() == 0:
            break
        t, t_prev = grid[cur[rows] + 1], grid[cur[rows]]
        x0_hat, eps_hat = backbone.pred_to_x0_eps(x[rows], predict(x[rows], t, rows), t)
        a_prev, s_prev = (v.view(-1, *([1] * (x.ndim - 1))) for v in backbone.alpha_sigma(t_prev))
        x[rows] = (a_prev * x0_hat + s_prev * eps_hat).to(x.dtype)
        cur[rows] -= 1
    everyone = torch.arange(len(x), device=x.device)
    t_end = grid[end.clamp(min=-1) + 1]
    target, _ = backbone.pred_to_x0_eps(x, predict(x, t_end, everyone), t_end)
    return x, target.float()


def renoise(
    x_end: torch.Tensor,
    alpha_end: torch.Tensor,
    sigma_end: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Forward-noise a sample of time t' further to s > t' (Self-NPO; the released code's re-noising):

        x_s = α_s·(x_t'/α_t' + sqrt(nsr_s² − nsr_t'²)·ε) = (α_s/α_t')·x_t' + sqrt(σ_s² − α_s²·nsr_t'²)·ε

    with nsr = σ/α. If x_t' = α_t'·x0 + σ_t'·ε₁ then x_s = α_s·x0 + σ_s·ε₂ in law (mean α_s·x0, variance σ_s²).
    `alpha_*`, `sigma_*` are `[N]`; `x_end`, `eps` are `[N, ...]`.
    """

    def b(v: torch.Tensor) -> torch.Tensor:
        return v.to(x_end.dtype).view(-1, *([1] * (x_end.ndim - 1)))

    nsr_end = sigma_end / alpha_end
    extra = (sigma_s**2 - (alpha_s * nsr_end) ** 2).clamp(min=0).sqrt()
    return b(alpha_s / alpha_end) * x_end + b(extra) * eps


def write_negative_offset(final: Path, base: str, subfolder: str, cls) -> Path:
    """`final/negative_offset.safetensors` = saved denoiser − base denoiser, parameters that changed only."""
    from safetensors.torch import save_file

    tuned = cls.from_pretrained(str(Path(final) / subfolder)).state_dict()
    original = cls.from_pretrained(base, subfolder=subfolder).state_dict()
    delta = {k: (v.float() - original[k].float()).contiguous() for k, v in tuned.items() if not v.equal(original[k])}
    path = Path(final) / "negative_offset.safetensors"
    save_file(delta, str(path))
    logger.info("negative offset δ = θ − θ_base (%d tensors): %s", len(delta), path)
    return path
