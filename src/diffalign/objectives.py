"""Every training objective of diffalign, as pure tensor math.

Tensors in, `(loss, stats)` out: no models, no devices, no I/O, inputs never modified. Trainers compute per-sample
denoising errors (`per_sample_error`) for the policy and the frozen reference; these functions turn them into a loss.
`stats` holds detached 0-d tensors with stable names, averaged by the loop over micro-batches and logged per step.

Notation (METHODS.md): `m_w, m_l` policy errors on winner / loser, `r_w, r_l` reference errors (no grad), β the
KL-regularisation strength. Errors are MEAN squared errors over (C, H, W), never sums — β values from the papers
assume means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`‖pred − target‖²` averaged over every non-batch dim, in float32.

    Args:
        pred (`torch.Tensor` of shape `[B, ...]`): model output.
        target (`torch.Tensor` of shape `[B, ...]`): training target (ε, v or flow velocity).

    Returns:
        `torch.Tensor` of shape `[B]`.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def _preference_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    scale: torch.Tensor | float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`loss = mean(−log σ(inside))`, `inside = −scale · ((m_w − m_l) − (r_w − r_l))`; `scale` scalar or `[B]`."""
    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -scale * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        stats = {
            # ties (inside == 0, e.g. policy == reference) count half, so step 0 reads 0.5
            "implicit_acc": ((inside > 0).float() + 0.5 * (inside == 0).float()).mean(),
            "reward_margin": inside.mean(),
            "model_diff": model_diff.mean(),
            "ref_diff": ref_diff.mean(),
            "model_err_w": model_err_w.mean(),
            "model_err_l": model_err_l.mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
    Eq. 14, in the official code's convention).

        inside = −½ · β · ((m_w − m_l) − (r_w − r_l)),   loss = mean(−log σ(inside))

    With policy == reference `inside = 0` and the loss is exactly log 2. A lower winner error than the reference's
    (or a higher loser error) raises `inside` and lowers the loss.

    β convention: the ½ is the official code's. The diffusers research script drops it, so its β = 2500 equals
    β = 5000 here (β_here = 2 · β_diffusers). Official launchers: β = 5000 (SD1.5, SDXL); paper SD1.5 runs: 2000.

    Args:
        model_err_w (`torch.Tensor` of shape `[B]`): policy error on the preferred image.
        model_err_l (`torch.Tensor` of shape `[B]`): policy error on the dispreferred image (same t, same ε).
        ref_err_w (`torch.Tensor` of shape `[B]`): reference error on the preferred image (no grad).
        ref_err_l (`torch.Tensor` of shape `[B]`): reference error on the dispreferred image (no grad).
        beta (`float`): KL strength β (official convention).

    Returns:
        `(loss, stats)`; stats: `implicit_acc` (fraction with inside > 0, ties half), `reward_margin` (mean inside),
        `reward_w` / `reward_l` (mean implicit rewards ½β(r − m)), `model_diff`, `ref_diff`, `model_err_w`,
        `model_err_l`.
    """
    loss, stats = _preference_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, 0.5 * beta)
    with torch.no_grad():
        stats["reward_w"] = (0.5 * beta * (ref_err_w - model_err_w)).mean().detach()
        stats["reward_l"] = (0.5 * beta * (ref_err_l - model_err_l)).mean().detach()
    return loss, stats


def smpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    soft_label: torch.Tensor,
    beta: float,
    gamma: float = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SmPO-Diffusion loss ("Smoothed Preference Optimization", Lu et al. 2025): DPO with the scale multiplied by
    the smoothed-label factor γ(2p − 1).

        inside = −½ · β · γ · (2p − 1) · ((m_w − m_l) − (r_w − r_l)),   loss = mean(−log σ(inside))

    With γ(2p − 1) = 1 this is `dpo_loss`; with p = ½ (equal rewards) `inside` ≡ 0 and the pair gives no gradient.

    Args:
        model_err_w, model_err_l, ref_err_w, ref_err_l (`torch.Tensor` of shape `[B]`): as in `dpo_loss`; in SmPO the
            noisy inputs come from inversion rather than forward noising, which the objective does not see.
        soft_label (`torch.Tensor` of shape `[B]`): p = P(winner ≻ loser) in [0.5, 1), see `soft_preference`.
        beta (`float`): β in the official (½) convention; 2000 (SD1.5) / 5000 (SDXL).
        gamma (`float`, *optional*, defaults to 10.0): γ of the paper.
    """
    factor = gamma * (2.0 * soft_label - 1.0)
    loss, stats = _preference_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, 0.5 * beta * factor)
    stats["label_factor"] = factor.detach().float().mean()
    return loss, stats


def soft_preference(score_w: torch.Tensor, score_l: torch.Tensor, tau: float) -> torch.Tensor:
    """Smoothed preference `p = σ((s_w − s_l) / τ)` (SmPO). τ is in the reward's own units (PickScore points; the
    reference code's raw-cosine τ ≈ 0.1666 equals τ ≈ 16.7 PickScore points at logit scale 100)."""
    if tau <= 0:
        raise ValueError(f"`tau` must be > 0, got {tau}")
    return torch.sigmoid((score_w - score_l) / tau)


def kto_loss(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    kl: torch.Tensor | float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-KTO loss (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility", Eq. 8), unpaired.

        g = r − m                       (implicit reward: how much the policy beats the reference on this image)
        kl = clamp(mean(g), min=0)      (reference point, detached; mean over the GLOBAL batch)
        z = sign · β · (g − kl),        sign = +1 desirable, −1 undesirable
        loss = mean(w · (1 − σ(z))),    w = λ_D or λ_U

    No ½ factor here (unlike `dpo_loss`). Paper default β = 5000.

    Args:
        model_err (`torch.Tensor` of shape `[B]`): policy error per image (own t and ε per image).
        ref_err (`torch.Tensor` of shape `[B]`): reference error per image (no grad).
        desirable (`torch.Tensor` of shape `[B]`, bool): True for desirable images.
        beta (`float`): β.
        kl (`torch.Tensor` or `float`, *optional*): the reference point. `None` → computed from this batch as above;
            a distributed trainer passes the value over the global batch.
        desirable_weight (`float`, *optional*, defaults to 1.0): λ_D.
        undesirable_weight (`float`, *optional*, defaults to 1.0): λ_U.

    Returns:
        `(loss, stats)`; stats: `kl`, `reward_desirable`, `reward_undesirable` (mean β·g per side, 0 if absent),
        `implicit_acc` (fraction with z > 0), `frac_desirable`.
    """
    desirable = desirable.bool()
    g = ref_err - model_err
    if kl is None:
        kl = g.detach().mean().clamp(min=0)
    kl = torch.as_tensor(kl, dtype=g.dtype, device=g.device).detach()
    sign = torch.where(desirable, 1.0, -1.0).to(g.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(g.dtype)
    z = sign * beta * (g - kl)
    loss = (weight * (1.0 - torch.sigmoid(z))).mean()
    with torch.no_grad():
        reward = beta * g
        stats = {
            "kl": kl,
            "reward_desirable": _masked_mean(reward, desirable),
            "reward_undesirable": _masked_mean(reward, ~desirable),
            "implicit_acc": (z > 0).float().mean() + 0.5 * (z == 0).float().mean(),
            "frac_desirable": desirable.float().mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def bound_negative_error(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    bound: float | None,
    negative: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Optional clip of TPO's negative (perturbed-caption) term: the policy's error on a negative row enters the loss
    as at most (1 + c) times the reference's error there.

        m̃ = min(m, (1 + c) · r)   on negative rows,   m̃ = m elsewhere;   equivalently  m̃ − r = min(m − r, c · r)

    Summaries of TPO (Xian et al. 2025, "Free Lunch Alignment of Text-to-Image Diffusion Models without Preference
    Image Pairs") mention a clipping mechanism on the negative term that stabilises training; its form and threshold
    are not public. This form is diffalign's choice: once the policy's error on (x, c_l) exceeds the reference's by
    the fraction c, the loser term is constant and gives no gradient, so the loss can no longer be lowered by
    degrading the model further on mismatched captions. The bound is relative to r because the error's scale varies
    with t by orders of magnitude. Below the bound nothing changes (gradient 1 through m).

    Args:
        model_err (`torch.Tensor` of shape `[B]`): policy errors m.
        ref_err (`torch.Tensor` of shape `[B]`): reference errors r (no grad).
        bound (`float`, *optional*): c ≥ 0; `None` returns `model_err` unchanged.
        negative (`torch.Tensor` of shape `[B]`, bool, *optional*): the negative rows (TKTO: the undesirable ones);
            `None` = every row (TDPO: pass the loser errors).

    Returns:
        `(m̃, stats)`; stats: `negative_excess` (mean of (m − r)/r over negative rows, before the bound) and
        `negative_clipped` (fraction of negative rows at the bound; 0 without a bound).
    """
    if bound is not None and bound < 0:
        raise ValueError(f"`bound` must be >= 0 or None, got {bound}")
    negative = torch.ones_like(model_err, dtype=torch.bool) if negative is None else negative.bool()
    ref = ref_err.detach()
    with torch.no_grad():
        excess = _masked_mean((model_err - ref) / ref.clamp(min=1e-12), negative)
    if bound is None:
        return model_err, {"negative_excess": excess, "negative_clipped": torch.zeros((), device=model_err.device)}
    cap = (1.0 + bound) * ref
    clipped = negative & (model_err > cap)
    bounded = torch.where(clipped, cap.to(model_err.dtype), model_err)
    stats = {"negative_excess": excess, "negative_clipped": _masked_mean(clipped.float(), negative).detach()}
    return bounded, stats


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Pseudo-Huber distance `mean(sqrt((pred − target)² + c²) − c)` (Song & Dhariwal 2023, "Improved Techniques
    for Training Consistency Models"), the Self-NPO loss. Quadratic below `c`, linear above; 0 when equal."""
    diff = pred.float() - target.float()
    return (torch.sqrt(diff.pow(2) + c * c) - c).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), values.new_zeros(()))


def dpo_implicit_reward(model_err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> torch.Tensor:
    """The Diffusion-DPO implicit reward of each image, as SAIL (He et al., ICLR 2026) uses it to label the model's
    own samples:

        r(c, x) = −β/2 · ( ‖ε − ε_θ(x_t, c, t)‖² − ‖ε − ε_ref(x_t, c, t)‖² ),   x_t = α_t·x + σ_t·ε

    averaged over the (t, ε) draws. `r_A − r_B` is the `inside` of `dpo_loss` for the pair (A, B), so
    `p(A ≻ B) = σ(r_A − r_B)`. The policy fitting an image better than the reference raises its reward; policy ==
    reference gives 0. Only the ranking is used for labels, so β's value changes margins, never winners.

    Not a loss: returns the rewards, no stats (nothing here is optimised).

    Args:
        model_err (`torch.Tensor` of shape `[K, N]` or `[N]`): policy errors of N images under K (t, ε) draws
            (`per_sample_error`, mean over C, H, W); a draw is shared by all N candidates of a prompt.
        ref_err (`torch.Tensor`, same shape): reference errors under the same draws.
        beta (`float`): β in the official Diffusion-DPO convention (with the ½).

    Returns:
        `torch.Tensor` of shape `[N]`: the mean over draws of −½β(m − r), float32.
    """
    if model_err.shape != ref_err.shape:
        raise ValueError(
            f"`model_err` and `ref_err` must have the same shape, got {tuple(model_err.shape)} and "
            f"{tuple(ref_err.shape)}"
        )
    reward = -0.5 * beta * (model_err.float() - ref_err.float())
    return reward.mean(dim=0) if reward.ndim == 2 else reward
