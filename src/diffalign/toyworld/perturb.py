"""TPO data for the toy world: the world's own renders of the `train` captions with confusable mismatched captions.

No image pairs and no reward: every image is a ground-truth render (`toyworld.render`) of its caption, and the
mismatched caption (`ConfusablePerturber`) replaces the shape colour or the background with one of the palette
colours closest to it, or the shape with another shape (`a red circle on a blue background` →
`a brown circle on a blue background`, `a red circle on a purple background`, `a red square on a blue background`).

Why not `RulePerturber(vocabulary=VOCABULARY)`: its colour replacements are uniform over the palette, so most
negatives are colours the base already tells apart, and TDPO can lower its loss by sharpening caption contrast the
model already has; measured on 54 train captions × 4 unseen seeds at CFG 3, TDPO on those perturbations scored
0.491 against the base, on confusable ones (this perturber) 0.576.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np

from diffalign.perturb.base import Perturbation, Perturber
from diffalign.perturb.dataset import perturb_dataset

from . import world

logger = logging.getLogger(__name__)


def write_toy_imagefolder(captions: list[str], images_per_caption: int, out_dir: str | Path, seed: int = 0) -> Path:
    """Render every caption `images_per_caption` times (random position/size from `(seed, caption index, k)`) into
    an HF imagefolder: `out_dir/<i>_<k>.png` + `metadata.jsonl` (`file_name`, `caption`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, caption in enumerate(captions):
        for k in range(images_per_caption):
            name = f"{i:04d}_{k:02d}.png"
            world.render(caption, np.random.default_rng([seed, i, k])).save(out_dir / name)
            lines.append(json.dumps({"file_name": name, "caption": caption}))
    (out_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir


class ConfusablePerturber(Perturber):
    """Hard negatives for toy captions: an edit kind uniformly from {shape colour, background, shape}; a colour is
    replaced by one of its `nearest` closest palette colours (RGB distance) other than the caption's other colour,
    a shape by another shape. The result is always another valid toy caption that differs in one content word.

    Args:
        nearest (`int`, *optional*, defaults to 2): how many of the closest colours a replacement is drawn from.
    """

    def __init__(self, nearest: int = 2) -> None:
        if nearest < 1:
            raise ValueError(f"`nearest` must be >= 1, got {nearest}")
        self.nearest = nearest

    def closest(self, colour: str, exclude: str) -> list[str]:
        """The `nearest` palette colours closest to `colour` (squared RGB distance), except `colour` and `exclude`."""
        return world.closest_colours(colour, exclude=(exclude,))[: self.nearest]

    def perturb(self, text: str, rng: random.Random) -> Perturbation | None:
        try:
            shape, colour, background = world.parse_caption(text)
        except ValueError:
            return None  # not a toy caption
        kind = rng.choice(("colour", "background", "shape"))
        if kind == "colour":
            new = rng.choice(self.closest(colour, background))
            return Perturbation(text, world.caption(shape, new, background), "attribute", f"colour: {colour} -> {new}")
        if kind == "background":
            new = rng.choice(self.closest(background, colour))
            edit = f"background: {background} -> {new}"
            return Perturbation(text, world.caption(shape, colour, new), "attribute", edit)
        new = rng.choice([s for s in world.SHAPES if s != shape])
        return Perturbation(text, world.caption(new, colour, background), "object", f"shape: {shape} -> {new}")


def toy_tpo_data(ctx: Any, images_per_caption: int = 8, per_caption: int = 2, nearest: int = 2) -> str:
    """`build_data` of the `tdpo`/`tkto` demos: renders of `ctx.train_prompts()` → `DIR/data/tpo_images/`, then
    `perturb_dataset` with `ConfusablePerturber` → `DIR/data/tpo.jsonl` (reused when the settings match)."""
    if ctx.quick:
        images_per_caption, per_caption = 2, 1
    out = ctx.data_dir / "tpo.jsonl"
    meta = ctx.data_dir / "tpo.json"
    settings = {"images_per_caption": images_per_caption, "per_caption": per_caption, "quick": ctx.quick}
    settings["perturber"] = f"confusable-{nearest}"
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
        logger.info("reusing %s", out)
        return str(out)
    images = write_toy_imagefolder(ctx.train_prompts(), images_per_caption, ctx.data_dir / "tpo_images")
    stats = perturb_dataset(images, out, ConfusablePerturber(nearest), seed=0, per_caption=per_caption)
    meta.write_text(json.dumps({"settings": settings, "stats": stats}, indent=2))
    logger.info("toy TPO data: %s -> %s", stats, out)
    return str(out)
