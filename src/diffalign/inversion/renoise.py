"""DDIM inversion and ReNoise inversion over any `Backbone`, batched, with optional CFG; and the matching sampler.

Inversion step k (see `Schedule`) maps z at level (α_from, σ_from) to the noisier level (α_to, σ_to). The sampler's
step goes the other way, z_from = α_from·x̂0 + σ_from·ε̂ with (x̂0, ε̂) from the model output p at (z_to, t); that is
linear in z_to for a fixed p, so holding p fixed it can be solved for z_to (`prediction_inverse_step`):

    ε-prediction:   z_to = α_to · (z_from − σ_from · ε̂) / α_from + σ_to · ε̂          (DDIM inversion)
    flow velocity:  z_to = z_from + (σ_to − σ_from) · v                               (the Euler step, run upwards)

The exact p is the model's at the unknown z_to itself (then sampling from z_to lands back on z_from). Plain DDIM
inversion (Song et al. 2021; Mokady et al. 2023) approximates it by p(z_from, t). ReNoise (Garibi et al. 2024,
"ReNoise: Real Image Inversion Through Iterative Noising", sec. 3) refines it by fixed-point iteration:

    1. z⁽⁰⁾ = z_from
    2. for i = 0 … K:  p⁽ⁱ⁾ = model(z⁽ⁱ⁾, t),  z⁽ⁱ⁺¹⁾ = prediction_inverse_step(z_from, p⁽ⁱ⁾)
    3. z_to = z⁽ᴷ⁺¹⁾, or with averaging, prediction_inverse_step(z_from, mean of p⁽ⁱ⁾ over the window
       start ≤ i < end)

K = 0 is plain DDIM (flow: Euler) inversion. K and the window may differ below a timestep (the official code: at
most 5 iterations and the window [0, 5) for t < 250, the window [8, 10) above; `ReNoiseConfig`, `RENOISE_SD`).
Optional: noise regularisation of each ε⁽ⁱ⁾ (`regularization.py`, ε-prediction models), and noise correction for
the stochastic DDIM sampler (η > 0): after each step the sampler's fresh noise n is solved for so that the η-step
from z_to lands exactly on z_from; `sample(..., noises=...)` then reconstructs exactly.

The conversions between model outputs (ε, v, flow velocity) and (x̂0, ε̂) are the backbone's own, so all of this is
family-agnostic (SD1.x/2.x, SDXL, SD3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from diffalign.backbones.base import Backbone

from .regularization import regularize_noise
from .schedule import Schedule, sampling_schedule
from .steps import ddim_stochastic_std, denoise_step

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReNoiseConfig:
    """How each inversion step estimates its noise. The bare defaults are plain DDIM inversion, so a partial spec
    means exactly what it sets; `RENOISE_SD` / `RENOISE_SDXL` are the official code's settings.

    ReNoise's official code (garibida/ReNoise-Inversion, `src/config.py` and `src/renoise_inversion.py`) treats the
    steps whose model timestep t is below 250 ("early", near the image) apart from the rest: at most 5 iterations
    there, and its own averaging window. A window `(start, end)` averages the estimates of iterations
    start ≤ i < end (end exclusive, as theirs); a window beyond the iterations run averages nothing (the last iterate
    is kept), which their SD/SDXL settings rely on: K = 1 with the late window (8, 10) means no averaging above
    t = 250.

    Args:
        num_renoise_steps (`int`, defaults to 0): K, extra fixed-point iterations per step (0 = plain DDIM inversion).
        average_from (`int`, *optional*): shorthand for `average_range=(average_from, K + 1)`: average iterations
            i ≥ this (0 … K) at every step. SmPO: K = 1, `average_from = 0`. Exclusive with `average_range`.
        average_range (`tuple[int, int]`, *optional*): window `[start, end)` of iterations whose estimates are
            averaged; the step is then retaken with the mean. `None` keeps the last iterate. Official default (8, 10).
        early_timestep (`float`, defaults to 0): steps with model timestep t < this use `early_max_renoise_steps` and
            `early_average_range` (official: 250; 0 = every step alike). Flow models compare σ·1000.
        early_max_renoise_steps (`int`, *optional*): K at early steps is min(K, this) (official: 5).
        early_average_range (`tuple[int, int]`, *optional*): the window at early steps (official: (0, 5)).
        lambda_kl (`float`, defaults to 0): patch-KL regularisation weight (ReNoise default 0.065; 0 = off).
        lambda_ac (`float`, defaults to 0): autocorrelation regularisation weight (ReNoise default 20; 0 = off).
        regularization_steps (`int`, defaults to 4), ac_rolls (`int`, defaults to 5): see `regularize_noise`.
        anchor (`str`, defaults to `"noised"`): where the patch-KL reference prediction ε̂* is taken: `"noised"` at
            α_t·x0 + σ_t·n (the paper; the official SDXL pipeline), `"clean"` at the clean latent x0 itself, with the
            step's timestep t (the official SD1.x/2.x pipeline, which replaces its scheduler's `add_noise` with the
            identity, so the anchor is ε̂(z0, t) at every step).
        noise_correction (`bool`, defaults to `False`): solve, per step, for the noise of a DDIM-η sampler that
            reconstructs the inverted trajectory exactly (VP backbones; needs `eta` > 0).
        eta (`float`, defaults to 0): η of the stochastic DDIM sampler the noise correction is for.
    """

    num_renoise_steps: int = 0
    average_from: int | None = None
    average_range: tuple[int, int] | None = None
    early_timestep: float = 0.0
    early_max_renoise_steps: int | None = None
    early_average_range: tuple[int, int] | None = None
    lambda_kl: float = 0.0
    lambda_ac: float = 0.0
    regularization_steps: int = 4
    ac_rolls: int = 5
    anchor: str = "noised"
    noise_correction: bool = False
    eta: float = 0.0

    def __post_init__(self):
        if self.num_renoise_steps < 0:
            raise ValueError(f"`num_renoise_steps` must be >= 0, got {self.num_renoise_steps}")
        if self.average_from is not None and not 0 <= self.average_from <= self.num_renoise_steps:
            raise ValueError(
                f"`average_from` must be in [0, num_renoise_steps={self.num_renoise_steps}] or None, "
                f"got {self.average_from}"
            )
        if self.average_from is not None and self.average_range is not None:
            raise ValueError(
                f"`average_from` ({self.average_from}) is a shorthand for `average_range` ({self.average_range}); "
                "set one of them"
            )
        for name in ("average_range", "early_average_range"):
            window = getattr(self, name)
            if window is not None:
                if len(window) != 2 or not 0 <= window[0] < window[1]:
                    raise ValueError(f"`{name}` must be (start, end) with 0 <= start < end, got {window}")
                object.__setattr__(self, name, (int(window[0]), int(window[1])))
        if self.early_max_renoise_steps is not None and self.early_max_renoise_steps < 0:
            raise ValueError(f"`early_max_renoise_steps` must be >= 0 or None, got {self.early_max_renoise_steps}")
        if self.anchor not in ("noised", "clean"):
            raise ValueError(f"`anchor` must be 'noised' or 'clean', got {self.anchor!r}")
        if self.noise_correction and self.eta <= 0:
            raise ValueError(f"`noise_correction` is for stochastic sampling and needs `eta` > 0, got {self.eta}")

    @property
    def regularize(self) -> bool:
        return self.regularization_steps > 0 and (self.lambda_kl > 0 or self.lambda_ac > 0)

    def at(self, early: bool) -> tuple[int, tuple[int, int] | None]:
        """`(K, averaging window)` of a step: early (t < `early_timestep`) or not."""
        window = self.average_range
        if self.average_from is not None:
            window = (self.average_from, self.num_renoise_steps + 1)
        if not early:
            return self.num_renoise_steps, window
        k = self.num_renoise_steps
        if self.early_max_renoise_steps is not None:
            k = min(k, self.early_max_renoise_steps)
        return k, self.early_average_range if self.early_average_range is not None else window


RENOISE_SD = ReNoiseConfig(
    num_renoise_steps=1,
    average_range=(8, 10),
    early_timestep=250,
    early_max_renoise_steps=5,
    early_average_range=(0, 5),
    lambda_kl=0.065,
    lambda_ac=20.0,
    regularization_steps=4,
    ac_rolls=5,
    anchor="clean",
)
"""ReNoise's official SD1.x/2.x settings (garibida/ReNoise-Inversion: `examples/inversion_example_sd.py` over the
`RunConfig` defaults; 50 DDIM steps, no noise correction): K = 1; above t = 250 no averaging (window (8, 10) is past
the 2 iterations) and so no regularisation; below t = 250 both estimates averaged, each regularised (patch-KL 0.065
toward ε̂(z0, t), autocorrelation 20, 4 rounds of 5 rolls). Inversion and reconstruction without CFG."""

RENOISE_SDXL = replace(RENOISE_SD, anchor="noised")
"""The official SDXL example: as `RENOISE_SD`, with the patch-KL anchor at the forward-noised α_t·z0 + σ_t·n."""


def paper_renoise(backbone: Backbone) -> ReNoiseConfig:
    """The official settings for `backbone`'s family: `RENOISE_SDXL` for SDXL, `RENOISE_SD` for other ε models;
    for v-prediction and flow models (which the official code does not support) the same iterations and windows
    without the noise regularisation (it acts on ε predictions)."""
    if backbone.prediction_type != "epsilon":
        return replace(RENOISE_SD, lambda_kl=0.0, lambda_ac=0.0)
    return RENOISE_SDXL if backbone.family == "sdxl" else RENOISE_SD


SMPO_RENOISE = ReNoiseConfig(num_renoise_steps=1, average_from=0)
"""SmPO's inversion (Lu et al. 2025, official code): one ReNoise pass, step with the mean of both estimates."""


@dataclass
class InversionResult:
    """`latents` `[N, ...]`: the inverted latents (at the top of the schedule, or at each row's `stop_at`).
    `steps` `[N]` long: schedule steps taken per row. `trajectory`: z after 0, 1, … n steps (if asked; rows that
    stopped keep their last value). `noises`: per step, the corrected sampler noise (`noise_correction`; zeros for rows
    that did not take the step). `schedule`: the grid used."""

    latents: torch.Tensor
    steps: torch.Tensor
    schedule: Schedule
    trajectory: list[torch.Tensor] | None = None
    noises: list[torch.Tensor] | None = None


def make_predictor(
    backbone: Backbone,
    cond: dict[str, torch.Tensor],
    *,
    denoiser: nn.Module | None = None,
    guidance_scale: float = 1.0,
    uncond: dict[str, torch.Tensor] | None = None,
) -> Predictor:
    """`(z [m], t [m], rows [m]) → model output [m, ...]` (float32) for rows `rows` of the batch `cond` belongs to.

    With `guidance_scale` ≠ 1 the output is classifier-free guided, p = p_u + w·(p_c − p_u) (Ho & Salimans 2022),
    which needs `uncond` (the conditioning of the empty or negative prompt, same structure as `cond`).
    """
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"`guidance_scale` {guidance_scale} != 1 needs `uncond` (the empty-prompt conditioning)")

    def predict(z: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        c = _take(cond, rows)
        if guidance_scale == 1.0:
            return backbone.predict(z, t, c, denoiser=denoiser).float()
        u = _take(uncond, rows)
        both = {k: torch.cat([u[k], c[k]]) for k in c}
        pred_u, pred_c = backbone.predict(torch.cat([z, z]), torch.cat([t, t]), both, denoiser=denoiser).chunk(2)
        return (pred_u + guidance_scale * (pred_c - pred_u)).float()

    return predict


def prediction_inverse_step(
    backbone: Backbone,
    z_from: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    alpha_from: torch.Tensor,
    sigma_from: torch.Tensor,
) -> torch.Tensor:
    """The z_to (at the level of timestep `t`) from which the sampler's step with model output `pred` lands on
    `z_from` (level (α_from, σ_from)), for any prediction type:

        z_from = α_from · x̂0(z_to, p) + σ_from · ε̂(z_to, p)
        x̂0 = a_x·z + b_x(p),  ε̂ = a_e·z + b_e(p)           (`backbone.pred_to_x0_eps` is linear in z and p)
        z_to = (z_from − α_from·b_x(p) − σ_from·b_e(p)) / (α_from·a_x + σ_from·a_e)

    For ε-prediction this is `ddim_inverse_step`; for flow velocity it is z_from + (σ_to − σ_from)·v.
    """
    ones = torch.ones(len(pred), *([1] * (pred.ndim - 1)), device=pred.device)
    a_x, a_e = backbone.pred_to_x0_eps(ones, torch.zeros_like(ones), t)
    b_x, b_e = backbone.pred_to_x0_eps(torch.zeros_like(pred), pred, t)
    a, s = (v.to(pred.device, torch.float32).view(-1, *([1] * (pred.ndim - 1))) for v in (alpha_from, sigma_from))
    return (z_from.float() - a * b_x - s * b_e) / (a * a_x + s * a_e)


def _take(cond: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of every conditioning tensor; a batch-1 tensor is shared by all rows."""
    return {k: v.expand(int(rows.max()) + 1, *v.shape[1:])[rows] if len(v) == 1 else v[rows] for k, v in cond.items()}


@torch.no_grad()
def invert(
    backbone: Backbone,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    schedule: Schedule | int = 50,
    *,
    renoise: ReNoiseConfig | None = None,
    guidance_scale: float = 1.0,
    uncond: dict[str, torch.Tensor] | None = None,
    denoiser: nn.Module | None = None,
    stop_at: torch.Tensor | None = None,
    land_on_stop: bool = False,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> InversionResult:
    """Invert clean latents `x0` up the sampler's grid with DDIM (K = 0) or ReNoise (K ≥ 1), all rows at once.

    Args:
        backbone (`Backbone`): any family; `denoiser` (e.g. a LoRA policy or a frozen copy) overrides its network.
        x0 (`torch.Tensor` `[N, C, h, w]`): clean (VAE-scaled) latents.
        cond (`dict`): `backbone.build_condition(...)` for the N rows (batch-1 tensors are shared).
        schedule (`Schedule` or `int`, defaults to 50): a grid, or a number of steps for `sampling_schedule`.
        renoise (`ReNoiseConfig`, *optional*): defaults to plain DDIM inversion.
        guidance_scale (`float`, defaults to 1.0), uncond (`dict`, *optional*): classifier-free guidance.
        stop_at (`torch.Tensor` `[N]`, *optional*): per-row timestep; a row takes only the grid steps with
            timestep < `stop_at` (SmPO: the inverse-grid steps below the training timestep).
        land_on_stop (`bool`, defaults to `False`): after the grid steps, take one more step to exactly `stop_at`.
        generator (`torch.Generator`, *optional*): draws the regularisation anchor noise and shifts.
        return_trajectory (`bool`, defaults to `False`): keep z after every step.

    Returns:
        [`InversionResult`].
    """
    renoise = renoise or ReNoiseConfig()
    if renoise.noise_correction and backbone.prediction_type == "flow_matching":
        raise ValueError("`noise_correction` is defined for the stochastic DDIM sampler of VP backbones, not for flow")
    if renoise.regularize and backbone.prediction_type != "epsilon":
        raise ValueError(
            f"noise regularisation (`lambda_kl`/`lambda_ac`) acts on ε predictions; this model predicts "
            f"{backbone.prediction_type!r}"
        )
    if stop_at is not None and stop_at.shape != (len(x0),):
        raise ValueError(f"`stop_at` must have one timestep per row, shape ({len(x0)},), got {tuple(stop_at.shape)}")
    if isinstance(schedule, int):
        schedule = sampling_schedule(backbone, schedule)
    device = x0.device
    schedule = schedule.to(device)
    predict = make_predictor(backbone, cond, denoiser=denoiser, guidance_scale=guidance_scale, uncond=uncond)
    z = x0.float().clone()
    n = len(z)
    steps = torch.zeros(n, dtype=torch.long, device=device)
    anchor = _anchor_noise(z, generator) if renoise.regularize and renoise.anchor == "noised" else None
    trajectory = [z.clone()] if return_trajectory else None
    noises = [] if renoise.noise_correction else None
    for k in range(len(schedule)):
        t = schedule.timesteps[k]
        rows = torch.arange(n, device=device) if stop_at is None else (t < stop_at.to(device)).nonzero().flatten()
        if len(rows) == 0:
            break  # timesteps ascend: no row takes a later step either
        levels = tuple(getattr(schedule, f)[k].expand(len(rows)) for f in ("alpha_from", "sigma_from"))
        levels += tuple(getattr(schedule, f)[k].expand(len(rows)) for f in ("alpha_to", "sigma_to"))
        z_to, noise = renoise_step(
            backbone, predict, z[rows], x0[rows].float(), t.expand(len(rows)), rows, levels, renoise, anchor, generator
        )
        z[rows] = z_to
        steps[rows] += 1
        if noises is not None:
            noises.append(torch.zeros_like(z).index_copy(0, rows, noise))
        if trajectory is not None:
            trajectory.append(z.clone())
    if land_on_stop and stop_at is not None:
        _land(backbone, predict, z, x0, stop_at.to(device), steps, schedule, renoise, anchor, generator)
    return InversionResult(z, steps, schedule, trajectory, noises)


def _land(backbone, predict, z, x0, stop_at, steps, schedule, renoise, anchor, generator) -> None:
    """One more ReNoise step per row, from its last grid level to exactly `stop_at` (in place)."""
    last = steps - 1
    reached = torch.where(last >= 0, schedule.timesteps[last.clamp(min=0)].to(stop_at.dtype), -1)
    rows = (stop_at > reached).nonzero().flatten()
    if len(rows) == 0:
        return
    idx = last[rows].clamp(min=0)
    taken = last[rows] >= 0
    a_from = torch.where(taken, schedule.alpha_to[idx], schedule.alpha_from[0])
    s_from = torch.where(taken, schedule.sigma_to[idx], schedule.sigma_from[0])
    a_to, s_to = backbone.alpha_sigma(stop_at[rows])
    levels = (a_from, s_from, a_to.to(z.device), s_to.to(z.device))
    plain = replace(renoise, noise_correction=False, eta=0.0)  # the sampler never walks this off-grid step
    args = (z[rows], x0[rows].float(), stop_at[rows], rows, levels, plain, anchor, generator)
    z[rows] = renoise_step(backbone, predict, *args)[0]
    steps[rows] += 1


def _anchor_noise(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else z.device
    return torch.randn(z.shape, generator=generator, device=device).to(z.device)


def renoise_step(
    backbone: Backbone,
    predict: Predictor,
    z_from: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    rows: torch.Tensor,
    levels: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: ReNoiseConfig,
    anchor: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One inversion step for `m` rows (module docstring, steps 1–3); returns `(z_to, corrected_noise or None)`.

    `levels` = (α_from, σ_from, α_to, σ_to), each `[m]`; `t` `[m]` the model timestep of the target level; `x0` the
    rows' clean latents (for the regularisation anchor). Rows below and above `cfg.early_timestep` (possible when
    landing on per-row timesteps) are stepped as two groups, each with its own K and window (`ReNoiseConfig.at`).
    """
    early = t < cfg.early_timestep
    if early.all() or not early.any():
        return _renoise_rows(backbone, predict, z_from, x0, t, rows, levels, cfg, bool(early[0]), anchor, generator)
    z_to, noise = torch.empty_like(z_from, dtype=torch.float32), None
    for group in (early, ~early):
        idx = group.nonzero().flatten()
        sub = (z_from[idx], x0[idx], t[idx], rows[idx], tuple(v[idx] for v in levels), cfg, bool(early[idx[0]]))
        z_group, n_group = _renoise_rows(backbone, predict, *sub, anchor, generator)
        z_to[idx] = z_group
        if n_group is not None:
            noise = torch.zeros_like(z_to) if noise is None else noise
            noise[idx] = n_group
    return z_to, noise


def _renoise_rows(backbone, predict, z_from, x0, t, rows, levels, cfg: ReNoiseConfig, early: bool, anchor, generator):
    """`renoise_step` for rows that share K and the averaging window. As the official code: the estimates in the
    window are averaged before regularisation; the iterates from the window's start on (without a window: from
    i = 1) and the mean are regularised."""
    a_from, s_from, a_to, s_to = levels
    k, window = cfg.at(early)
    first_regularized = window[0] if window is not None else 1
    reference = None
    if cfg.regularize and first_regularized <= k:
        anchored = x0
        if cfg.anchor == "noised":
            anchored = a_to.view(-1, 1, 1, 1) * x0 + s_to.view(-1, 1, 1, 1) * anchor[rows]
        reference = predict(anchored, t, rows)
    z_est, estimates = z_from, []
    for i in range(k + 1):
        pred = predict(z_est, t, rows)
        if window is not None and window[0] <= i < window[1]:
            estimates.append(pred)
        if reference is not None and i >= first_regularized:
            pred = _regularize(pred, reference, cfg, generator)
        z_est = prediction_inverse_step(backbone, z_from, pred, t, a_from, s_from)
    if estimates:
        pred = torch.stack(estimates).mean(0)
        if reference is not None:
            pred = _regularize(pred, reference, cfg, generator)
        z_est = prediction_inverse_step(backbone, z_from, pred, t, a_from, s_from)
    noise = None
    if cfg.noise_correction:
        noise = _corrected_noise(backbone, predict, z_est, z_from, t, rows, levels, cfg.eta)
    return z_est, noise


def _regularize(eps, reference, cfg: ReNoiseConfig, generator) -> torch.Tensor:
    out = regularize_noise(
        eps, reference, cfg.lambda_kl, cfg.lambda_ac, cfg.regularization_steps, cfg.ac_rolls, generator
    )
    if not torch.isfinite(out).all():
        raise FloatingPointError(
            f"ReNoise noise regularisation diverged (lambda_kl={cfg.lambda_kl}, lambda_ac={cfg.lambda_ac}, "
            f"anchor={cfg.anchor!r}, latent {tuple(eps.shape[-2:])}, ε̂* std {float(reference.std()):.3g}): its "
            "gradient steps overshoot on small latents (the toy model's 8×8 diverges with ReNoise's own weights). "
            "Lower or zero `lambda_kl` / `lambda_ac`."
        )
    return out


def _corrected_noise(backbone, predict, z_to, z_from, t, rows, levels, eta: float) -> torch.Tensor:
    """n such that the DDIM-η step from `z_to` gives `z_from` exactly: n = (z_from − deterministic part) / s."""
    a_from, s_from, a_to, s_to = levels
    x0_hat, eps_hat = backbone.pred_to_x0_eps(z_to, predict(z_to, t, rows), t)
    std = ddim_stochastic_std(a_to, s_to, a_from, s_from, eta).to(z_to.device)
    deterministic = denoise_step(x0_hat, eps_hat, a_from, s_from, std, torch.zeros_like(z_to))
    safe = std.clamp(min=1e-12).view(-1, 1, 1, 1)
    return torch.where(std.view(-1, 1, 1, 1) > 0, (z_from - deterministic) / safe, torch.zeros_like(z_to))


@torch.no_grad()
def sample(
    backbone: Backbone,
    z: torch.Tensor,
    cond: dict[str, torch.Tensor],
    schedule: Schedule | int = 50,
    *,
    guidance_scale: float = 1.0,
    uncond: dict[str, torch.Tensor] | None = None,
    denoiser: nn.Module | None = None,
    eta: float = 0.0,
    noises: list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the sampler whose inverse `invert` is: DDIM (VP, η ≥ 0) or the flow Euler step (SD3, η = 0), from the top
    of `schedule` down to its clean level. `noises` (from `invert(..., renoise=ReNoiseConfig(noise_correction=True,
    eta=η))`) replaces the fresh noise of each η-step. Returns the clean latents `[N, C, h, w]` (float32)."""
    if isinstance(schedule, int):
        schedule = sampling_schedule(backbone, schedule)
    if eta > 0 and backbone.prediction_type == "flow_matching":
        raise ValueError(f"`eta` > 0 (stochastic DDIM) needs a VP backbone, got a flow-matching one (eta={eta})")
    if noises is not None and len(noises) != len(schedule):
        raise ValueError(f"`noises` must have one tensor per schedule step ({len(schedule)}), got {len(noises)}")
    schedule = schedule.to(z.device)
    predict = make_predictor(backbone, cond, denoiser=denoiser, guidance_scale=guidance_scale, uncond=uncond)
    rows = torch.arange(len(z), device=z.device)
    z = z.float()
    for k in reversed(range(len(schedule))):
        t = schedule.timesteps[k].expand(len(z))
        x0_hat, eps_hat = backbone.pred_to_x0_eps(z, predict(z, t, rows), t)
        a, s = schedule.alpha_from[k], schedule.sigma_from[k]
        std = ddim_stochastic_std(schedule.alpha_to[k], schedule.sigma_to[k], a, s, eta) if eta > 0 else 0.0
        noise = None
        if eta > 0:
            noise = noises[k] if noises is not None else _anchor_noise(z, generator)
        z = denoise_step(x0_hat, eps_hat, a, s, std, noise)
    return z
