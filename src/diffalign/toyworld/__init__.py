"""The toy world: the embedded default in which every alignment method runs and is measured on a CPU.

- `world`: synthetic 32×32 images of one coloured shape on a coloured background, their captions and the fixed
  `train`/`heldout` split of combinations (`prompts`, `render`, `parse_caption`);
- `reward`: a deterministic pixel-statistics reward (`toy_reward`) and per-image correctness (`toy_components`);
- `models`: the tiny SD-shaped VAE / CLIP text encoder / UNet configurations;
- `sampling`: the shipped pre-trained pipeline (`pipeline_path`, `load_pipeline`), its default `SAMPLING` settings,
  and `score_pipeline` to measure a pipeline with the toy reward.
"""

from .reward import toy_components, toy_reward
from .sampling import SAMPLING, generate, load_pipeline, pipeline_path, score_pipeline
from .world import (
    COLOURS,
    RESOLUTION,
    SHAPES,
    SPLITS,
    VOCABULARY,
    caption,
    closest_colours,
    parse_caption,
    prompts,
    render,
    render_batch,
)

__all__ = [
    "COLOURS",
    "RESOLUTION",
    "SAMPLING",
    "SHAPES",
    "SPLITS",
    "VOCABULARY",
    "caption",
    "closest_colours",
    "generate",
    "load_pipeline",
    "parse_caption",
    "pipeline_path",
    "prompts",
    "render",
    "render_batch",
    "score_pipeline",
    "toy_components",
    "toy_reward",
]
