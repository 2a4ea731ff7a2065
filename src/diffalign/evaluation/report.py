"""Human-readable outputs: image grids, the markdown report, and training-metric plots."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

LABEL_WIDTH = 220
HEADER_HEIGHT = 24
CAPTION_HEIGHT = 14
MIN_CELL = 128


def image_grid(
    rows: Sequence[Sequence[str | Path | Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    out_png: str | Path,
    cell: int | None = None,
    cell_labels: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Save a grid PNG: one row per prompt (labelled with its text), one column per model (labelled with its name).

    Args:
        rows (`Sequence[Sequence[path | PIL.Image]]`): `rows[r][c]` is the image of prompt `r` by model `c`.
        cell (`int`, *optional*): cell size in pixels; defaults to the image size, at least 128 (small images are
            enlarged with nearest-neighbour so pixels stay visible).
        cell_labels (`Sequence[Sequence[str]]`, *optional*): a caption under each image (`rows × columns`), e.g.
            its seed and reward score.
    """
    if len(rows) != len(row_labels) or any(len(r) != len(col_labels) for r in rows):
        raise ValueError(f"`rows` must be {len(row_labels)} × {len(col_labels)} images")
    if not rows:
        raise ValueError("`rows` is empty")
    first = _open(rows[0][0])
    cell = cell or max(MIN_CELL, first.width)
    strip = CAPTION_HEIGHT if cell_labels is not None else 0
    height = HEADER_HEIGHT + (cell + strip) * len(rows)
    grid = Image.new("RGB", (LABEL_WIDTH + cell * len(col_labels), height), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(col_labels):
        draw.text((LABEL_WIDTH + c * cell + 4, 6), name[: cell // 7], fill="black")
    for r, (paths, label) in enumerate(zip(rows, row_labels)):
        top = HEADER_HEIGHT + r * (cell + strip)
        for c, caption in enumerate(cell_labels[r] if cell_labels is not None else []):
            draw.text((LABEL_WIDTH + c * cell + 4, top + cell + 2), caption[: cell // 6], fill="black")
        draw.multiline_text((4, top + 4), "\n".join(textwrap.wrap(label, 34)[:8]), fill="black")
        for c, path in enumerate(paths):
            tile = _open(path).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (LABEL_WIDTH + c * cell, top))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png


def _open(image: str | Path | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as opened:
        opened.load()
        return opened.copy()


def markdown_report(results: dict[str, Any]) -> str:
    """The results table (mean ± std per model and reward) and the win-rate table, as markdown."""
    models = results["models"]
    rewards = list(next(iter(models.values())).keys()) if models else []
    lines = ["# Evaluation", ""]
    settings = results.get("settings", {})
    if settings:
        seeds = settings.get("seeds", [])
        lines += [
            f"Prompts: `{settings.get('prompts')}` ({settings.get('num_prompts')} prompts) × {len(seeds)} seed(s); "
            f"sampler `{settings.get('scheduler')}`, {settings.get('num_inference_steps')} steps, "
            f"guidance {settings.get('guidance_scale')}.",
            "",
        ]
    lines += ["| model | " + " | ".join(rewards) + " |", "|---" * (len(rewards) + 1) + "|"]
    for name, per_reward in models.items():
        cells = [f"{per_reward[r]['mean']:.4g} ± {per_reward[r]['std']:.2g}" for r in rewards]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results.get("win_rates"):
        lines += ["", "## Win rates (ties count half; 95 % CI from a bootstrap over prompts)", ""]
        lines += ["| comparison | " + " | ".join(rewards) + " |", "|---" * (len(rewards) + 1) + "|"]
        for pair, per_reward in results["win_rates"].items():
            cells = []
            for r in rewards:
                w = per_reward[r]
                cells.append(f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] (n={w['n']})")
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    if results.get("grid"):
        lines += ["", f"![grid]({results['grid']})"]
    return "\n".join(lines) + "\n"


def plot_metrics(
    metrics_jsonl: str | Path, out_png: str | Path, keys: Sequence[str] = ("loss", "implicit_acc")
) -> Path:
    """Plot training curves from a trainer's `metrics.jsonl` (one JSON object per optimizer step, with `step`):
    one panel per key in `keys` that appears in the file, value vs step."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in threads

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    present = [k for k in keys if any(k in rec for rec in records)]
    if not present:
        raise ValueError(f"{str(metrics_jsonl)!r} has none of the keys {list(keys)}")
    fig = Figure(figsize=(4.5 * len(present), 3.2))
    axes = fig.subplots(1, len(present), squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(rec["step"], rec[key]) for rec in records if key in rec and rec.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
