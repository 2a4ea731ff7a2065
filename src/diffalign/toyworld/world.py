"""The toy world: one coloured shape on a background of another colour, 32×32 RGB.

A caption names everything in the image: `"a red circle on a blue background"`. The combinations
(shape, colour, background) are split once and for all into a `train` and a `heldout` set: a held-out combination
never appears in any training data (not for the VAE, not for the UNet), but every word of it does, and so does
every (colour, shape) pair and every (colour, background) pair. A model that binds words to the right object
generalises to the held-out set; a model that only memorised combinations does not.

The palette has pairs of close colours (red/pink/brown, cyan/blue, blue/purple, purple/pink) so that colour binding
is imperfect for a small model, which leaves room for alignment methods to show an effect.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
"""Side of every image of the world, in pixels."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape words. A square is axis-aligned; a triangle is upright and isosceles, its base the bottom of its box."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "pink": (235, 125, 165),
    "brown": (135, 80, 40),
    "yellow": (230, 205, 50),
    "green": (50, 160, 60),
    "cyan": (55, 190, 200),
    "blue": (45, 80, 205),
    "purple": (135, 60, 175),
    "grey": (128, 128, 128),
}
"""Colour words and their exact sRGB values (0–255); used both for rendering and by the toy reward."""

FILLER_WORDS: tuple[str, ...] = ("a", "on", "background")
VOCABULARY: tuple[str, ...] = tuple(sorted(set(SHAPES) | set(COLOURS) | set(FILLER_WORDS)))
"""Every word a caption can contain; each is one token of the shipped tokenizer."""

SPLITS: tuple[str, ...] = ("train", "heldout")

_SIZE_RANGE = (11, 22)  # side of the shape's bounding box in pixels, inclusive
_MARGIN = 2  # the shape stays this many pixels away from the border, so the border is pure background
_SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges, exact colours inside
_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def closest_colours(colour: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The other palette colours ordered from closest to farthest from `colour` (squared RGB distance), leaving out
    `exclude`: the world's confusable colours come first (red → brown, grey, purple, ...)."""
    others = [c for c in COLOURS if c != colour and c not in exclude]
    return sorted(others, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], COLOURS[colour])))


def caption(shape: str, colour: str, background: str) -> str:
    """The caption of a combination: `caption("circle", "red", "blue") == "a red circle on a blue background"`."""
    _check_combination(shape, colour, background)
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of `caption`: `"a red circle on a blue background"` → `("circle", "red", "blue")`.

    Raises:
        ValueError: if `text` does not follow the template or names an unknown shape or colour.
    """
    match = _CAPTION_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"`caption` must look like 'a red circle on a blue background', got {text!r}")
    colour, shape, background = match.groups()
    _check_combination(shape, colour, background)
    return shape, colour, background


def _check_combination(shape: str, colour: str, background: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {shape!r}")
    for name, value in (("colour", colour), ("background", background)):
        if value not in COLOURS:
            raise ValueError(f"`{name}` must be one of {list(COLOURS)}, got {value!r}")
    if colour == background:
        raise ValueError(f"`colour` and `background` must differ, got {colour!r} for both")


def _is_heldout(shape: str, colour: str, background: str) -> bool:
    """The fixed split. With indices `s` in `SHAPES`, `c`, `b` in `COLOURS` and the colour offset
    `d = (b - c) mod 9` (1..8), a combination is held out iff `(d + 3 s) mod 4 == 0`, i.e. offsets {4, 8} for
    circles, {1, 5} for squares, {2, 6} for triangles. So for every (shape, colour) exactly 2 of the 8 backgrounds
    are held out (54 of 216 combinations), every (colour, shape), (colour, background) and (shape, background) pair
    still occurs in train, and the colour-swapped twin of every held-out caption ("a blue circle on a red
    background" for "a red circle on a blue background") is in train: the held-out set tests binding."""
    names = list(COLOURS)
    offset = (names.index(background) - names.index(colour)) % len(names)
    return (offset + 3 * SHAPES.index(shape)) % 4 == 0


@cache
def _split_table() -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {"train": [], "heldout": []}
    for shape in SHAPES:
        for colour in COLOURS:
            for background in COLOURS:
                if colour != background:
                    split = "heldout" if _is_heldout(shape, colour, background) else "train"
                    table[split].append(caption(shape, colour, background))
    return {split: tuple(captions) for split, captions in table.items()}


def vocabulary() -> list[str]:
    """Every word of toy captions (the `toy` vocabulary plug-in of `diffalign perturb --vocabulary toy`)."""
    return list(VOCABULARY)


def prompts(split: str) -> list[str]:
    """All captions of a split, in a fixed order (shape, then colour, then background, as in `SHAPES`/`COLOURS`).

    Args:
        split (`str`): `"train"` or `"heldout"`.

    Raises:
        ValueError: for any other split.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}")
    return list(_split_table()[split])


def render(text: str, rng: np.random.Generator | int | None = None) -> Image.Image:
    """Draw the image a caption describes: the shape in its colour, at a random position and size, on the
    background colour. Sizes (bounding-box side) are uniform in 11–22 px and the shape keeps 2 px from the border.

    Args:
        text (`str`): a caption as produced by `caption`.
        rng (`np.random.Generator | int | None`, *optional*): randomness for position and size; an int is a seed.

    Returns:
        `PIL.Image.Image`: a 32×32 RGB image.
    """
    shape, colour, background = parse_caption(text)
    rng = np.random.default_rng(rng)
    size = int(rng.integers(_SIZE_RANGE[0], _SIZE_RANGE[1] + 1))
    x0 = int(rng.integers(_MARGIN, RESOLUTION - _MARGIN - size + 1))
    y0 = int(rng.integers(_MARGIN, RESOLUTION - _MARGIN - size + 1))
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (RESOLUTION * s, RESOLUTION * s), COLOURS[background])
    draw = ImageDraw.Draw(canvas)
    box = (x0 * s, y0 * s, (x0 + size) * s - 1, (y0 + size) * s - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return canvas.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def render_batch(captions: list[str], rng: np.random.Generator | int | None = None) -> np.ndarray:
    """`render` for many captions at once: a uint8 array `[N, 32, 32, 3]` (one `rng` drives all images)."""
    rng = np.random.default_rng(rng)
    return np.stack([np.asarray(render(text, rng)) for text in captions])
