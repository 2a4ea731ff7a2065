"""Shared pieces of the trainer tests: a tiny-run config and the metrics reader."""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.config import build_config


def png_bytes(colour: tuple[int, int, int], size: int) -> bytes:
    """A `size`² PNG of `colour` with a white block in its top-left quarter (asymmetric: flips and crops matter)."""
    import io

    from PIL import Image

    img = Image.new("RGB", (size, size), colour)
    img.paste((255, 255, 255), (0, 0, size // 2, size // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


TINY_RUN = dict(
    max_steps=2, learning_rate=1e-3, lora_rank=4, checkpointing_steps=0, lr_scheduler="constant", max_grad_norm=0.0
)
"""Two quick steps, LoRA rank 4, no checkpoints, constant LR, no clipping; tests override what they need."""


def tiny_config(trainer_cls, model, data, out, **overrides):
    """`trainer_cls.config_class` for a tiny run of `model` on `data` into `out`."""
    values = {"model": str(model), "data": str(data), "output_dir": str(out), **TINY_RUN, **overrides}
    return build_config(trainer_cls.config_class, values)


def read_metrics(out: str | Path) -> list[dict]:
    """The records of `out/metrics.jsonl`, one per optimizer step."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
