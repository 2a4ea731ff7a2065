"""A deterministic reward for the toy world, computed from pixel statistics only (no model, no randomness).

Each image is read as a background plus one foreground blob:

1. background colour `bg` = per-channel median of the border ring (the outer `max(1, H // 16)` pixels; 2 at 32×32);
2. foreground mask = pixels whose Euclidean RGB distance to `bg` exceeds `MASK_THRESHOLD` (0.15, half the smallest
   distance between two palette colours); fewer than `MIN_PIXELS` (4) such pixels means "no shape";
3. shape colour `fg` = per-channel median of the masked pixels;
4. coverage of each pixel by the shape, by unmixing it between the two colours:
   `α = clamp(<x - bg, fg - bg> / ||fg - bg||², 0, 1)`, kept only within one pixel of the core `α > 0.5` (stray
   specks elsewhere are ignored); blur and anti-aliasing move coverage across an edge but keep its sum;
5. fill ratio `f = Σ α / (bounding-box area of the core)`: circle π/4 ≈ 0.785, square 1, triangle 1/2;
6. vertical skewness `g` of the coverage profile `w(y) = Σ_x α(x, y)` (y grows downwards): 0 for the symmetric
   circle and square, `-2√2/5 ≈ -0.566` for the upright triangle (width grows linearly from the apex). A symmetric
   blur adds variance but keeps the third cumulant, so `g` survives blur.

Colours are classified against the world's palette (`COLOURS`, RGB scaled to [0, 1]) with a Gaussian soft-max,

    p(k | x) = exp(-||x - palette_k||² / τ_c) / Σ_j exp(-||x - palette_j||² / τ_c),   τ_c = 0.01,

and shapes against the prototypes `SHAPE_PROTOTYPES` (f, g) the same way,

    p(s | f, g) ∝ exp(-(f - f_s)² / τ_f - (g - g_s)² / τ_g),   τ_f = 0.005, τ_g = 0.05.

The reward is

    toy_reward = 0.5 · p(colour | fg) + 0.25 · p(background | bg) + 0.25 · p(shape | f, g)   ∈ [0, 1],

with the first and last terms 0 when no shape is found. An exact rendering scores ≈ 1; the same image with a
wrong shape colour scores ≈ 0.5, with a wrong background or a wrong shape ≈ 0.75.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.rewards.base import Reward, resolve_device

from .world import COLOURS, SHAPES, parse_caption

WEIGHTS: dict[str, float] = {"colour": 0.5, "background": 0.25, "shape": 0.25}
"""Weights of the three fidelity terms in `toy_reward` (they sum to 1)."""

SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (0.785, 0.0),
    "square": (1.0, 0.0),
    "triangle": (0.5, -0.566),
}
"""(fill ratio of the bounding box, vertical skewness) of each ideal shape: (π/4, 0), (1, 0), (1/2, -2√2/5)."""

MASK_THRESHOLD = 0.15
MIN_PIXELS = 4
COLOUR_TEMPERATURE = 0.01
FILL_TEMPERATURE = 0.005
SKEW_TEMPERATURE = 0.05

_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0  # [K, 3]
_PROTOTYPES = torch.tensor([SHAPE_PROTOTYPES[s] for s in SHAPES])  # [S, 2]


def toy_reward(images: torch.Tensor | Sequence[Image.Image], prompts: list[str]) -> torch.Tensor:
    """How well each image matches its caption: `0.5·p(colour) + 0.25·p(background) + 0.25·p(shape)`, each `p` the
    soft-max posterior of the named colour/shape given the measured pixel statistics (see the module docstring).

    Args:
        images (`torch.Tensor` or list of `PIL.Image.Image`): float `[N, 3, H, W]` in [0, 1], or N RGB images.
        prompts (`list[str]`): N captions of the toy world, e.g. `"a red circle on a blue background"`.

    Returns:
        `torch.Tensor`: float32 `[N]` scores in [0, 1] on the CPU.
    """
    probs = _posteriors(images, prompts)
    return sum(WEIGHTS[name] * probs[name] for name in WEIGHTS)


def toy_components(images: torch.Tensor | Sequence[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per-image 0/1 correctness for reporting accuracies, float32 `[N]` each.

    Keys: `colour_correct` (a shape was found and its colour's nearest palette colour is the named one),
    `background_correct` (same for the background), `shape_correct` (a shape was found and its (fill, skewness) is
    most probable for the named shape), `all_correct` (all three); plus the soft terms of `toy_reward` as `p_colour`,
    `p_background`, `p_shape`.
    """
    probs = _posteriors(images, prompts)
    out = {f"{name}_correct": probs[f"{name}_hit"].float() for name in WEIGHTS}
    out["all_correct"] = out["colour_correct"] * out["background_correct"] * out["shape_correct"]
    out.update({f"p_{name}": probs[name] for name in WEIGHTS})
    return out


def _posteriors(images: torch.Tensor | Sequence[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
    pixels = _as_tensor(images)
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"`prompts` must have one caption per image ({pixels.shape[0]}), got {len(prompts)}")
    parsed = [parse_caption(p) for p in prompts]
    names = list(COLOURS)
    shape_idx = torch.tensor([SHAPES.index(s) for s, _, _ in parsed])
    colour_idx = torch.tensor([names.index(c) for _, c, _ in parsed])
    background_idx = torch.tensor([names.index(b) for _, _, b in parsed])

    stats = measure(pixels)
    p_colour = _softmax_posterior(_sq_dist(stats["foreground"], _PALETTE), COLOUR_TEMPERATURE)
    p_background = _softmax_posterior(_sq_dist(stats["background"], _PALETTE), COLOUR_TEMPERATURE)
    shape_dist = (stats["fill"][:, None] - _PROTOTYPES[None, :, 0]) ** 2 / FILL_TEMPERATURE
    shape_dist = shape_dist + (stats["skew"][:, None] - _PROTOTYPES[None, :, 1]) ** 2 / SKEW_TEMPERATURE
    p_shape = _softmax_posterior(shape_dist, 1.0)
    found = stats["found"]
    rows = torch.arange(len(parsed))
    return {
        "colour": p_colour[rows, colour_idx] * found,
        "background": p_background[rows, background_idx],
        "shape": p_shape[rows, shape_idx] * found,
        "colour_hit": (p_colour.argmax(1) == colour_idx) & found.bool(),
        "background_hit": p_background.argmax(1) == background_idx,
        "shape_hit": (p_shape.argmax(1) == shape_idx) & found.bool(),
    }


def measure(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel statistics of `[N, 3, H, W]` images in [0, 1] (steps 1–6 of the module docstring): `background` and
    `foreground` colours `[N, 3]`, `fill` ratio and `skew` `[N]`, `found` (1.0 if at least `MIN_PIXELS` foreground
    pixels) and the shape's coverage `alpha` `[N, H, W]`. Images without a shape get foreground = background and
    fill = skew = 0."""
    h, w = pixels.shape[-2:]
    width = max(1, h // 16)
    border = torch.ones(h, w, dtype=torch.bool)
    border[width : h - width, width : w - width] = False
    background = pixels[:, :, border].median(dim=2).values  # [N, 3]
    mask = (pixels - background[:, :, None, None]).norm(dim=1) > MASK_THRESHOLD  # [N, H, W]
    found = (mask.flatten(1).sum(1) >= MIN_PIXELS).float()
    masked = torch.where(mask[:, None], pixels, torch.full_like(pixels, float("nan")))
    foreground = torch.where(found[:, None].bool(), masked.flatten(2).nanmedian(dim=2).values, background)

    alpha = _coverage(pixels, background, foreground)
    core = alpha > 0.5
    alpha = alpha * F.max_pool2d(core[:, None].float(), 3, stride=1, padding=1)[:, 0]
    box = _extent(core.any(dim=2)) * _extent(core.any(dim=1))
    fill = torch.where(found.bool(), alpha.flatten(1).sum(1) / box.clamp(min=1), torch.zeros_like(box))
    skew = _vertical_skewness(alpha) * found
    return {
        "background": background,
        "foreground": foreground,
        "fill": fill,
        "skew": skew,
        "found": found,
        "alpha": alpha,
    }


def _coverage(pixels: torch.Tensor, background: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """α = clamp(<x - bg, fg - bg> / ||fg - bg||², 0, 1) per pixel, `[N, H, W]`."""
    contrast = (foreground - background)[:, :, None, None]
    alpha = ((pixels - background[:, :, None, None]) * contrast).sum(1)
    return (alpha / (contrast**2).sum(1).clamp(min=1e-6)).clamp(0, 1)


def _vertical_skewness(alpha: torch.Tensor) -> torch.Tensor:
    """Skewness κ3 / κ2^1.5 of the row profile `w(y) = Σ_x α(x, y)` of `[N, H, W]` coverages, `[N]`."""
    profile = alpha.sum(dim=2)  # [N, H]
    y = torch.arange(alpha.shape[1], dtype=alpha.dtype)
    mass = profile.sum(1).clamp(min=1e-6)
    mean = (profile * y).sum(1) / mass
    centred = y[None] - mean[:, None]
    var = (profile * centred**2).sum(1) / mass
    third = (profile * centred**3).sum(1) / mass
    return third / var.clamp(min=1e-6) ** 1.5


def _extent(any_along: torch.Tensor) -> torch.Tensor:
    """Length of the span from the first to the last True of each row of a `[N, L]` bool tensor (0 if none)."""
    idx = torch.arange(any_along.shape[1])
    first = torch.where(any_along, idx, any_along.shape[1]).min(dim=1).values
    last = torch.where(any_along, idx, -1).max(dim=1).values
    return (last - first + 1).clamp(min=0).float()


def _sq_dist(x: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :] - palette[None]) ** 2).sum(-1)


def _softmax_posterior(sq_dist: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(-sq_dist / temperature, dim=1)


def _as_tensor(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
        if not arrays:
            raise ValueError("`images` must not be empty")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must be [N, 3, H, W], got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    lo, hi = images.min().item(), images.max().item()
    if lo < -0.01 or hi > 1.01:
        raise ValueError(
            f"`images` must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]; map [-1, 1] with (x + 1) / 2"
        )
    return images.clamp(0, 1)


class ToyReward(Reward):
    """`toy_reward(images [N, 3, H, W] in [0, 1], prompts) -> [N]` behind the reward interface (the `toy` plug-in of
    `diffalign.rewards`); PIL inputs are converted first."""

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 256) -> None:
        super().__init__(device, None, batch_size)

    def score_batch(self, images: list[torch.Tensor], prompts: list[str]) -> torch.Tensor:
        sizes = {tuple(image.shape) for image in images}
        if len(sizes) > 1:
            raise ValueError(f"the toy reward needs images of one size, got {sorted(sizes)}")
        return torch.as_tensor(toy_reward(torch.stack(images).to(self.device), prompts))


def make_toy_reward(
    device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None, batch_size: int = 256
) -> ToyReward:
    """Factory of the `toy` reward: how well a rendered 32×32 image matches its caption. `dtype` is accepted for
    interface uniformity and ignored (the reward is exact arithmetic on pixels)."""
    return ToyReward(resolve_device(device), batch_size)
