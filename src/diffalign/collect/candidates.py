"""Candidates to label: K images per prompt with recorded seeds and sampler settings, and the queue of pairs.

Image k of a prompt starts from seed `seed + k` (one CPU generator per image, as in `diffalign.evaluation`), so the
same command regenerates the same images, and a restart reuses every image already on disk. Each prompt's K
candidates give all K·(K−1)/2 pairs, shown in a seeded random order with a random side for each image; a few
pairs (`repeat_fraction`) come back later with the sides swapped — the self-consistency check.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

from diffalign.config import ConfigError

from .store import LabelStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectSettings:
    """Everything that decides the candidates; a restart with other values is refused (its images would differ)."""

    model: str
    lora: str | None
    prompts: str
    max_prompts: int | None
    per_prompt: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    resolution: int | None
    repeat_fraction: float
    reward: str | None


def prepare(folder: str | Path, settings: CollectSettings, batch_size: int = 8) -> LabelStore:
    """Generate (or reuse) the candidates, score them with `settings.reward` if given, and build the pair queue
    once. Returns the store."""
    if settings.per_prompt < 2:
        raise ConfigError(f"`per_prompt` must be at least 2 (a pair), got {settings.per_prompt}")
    if not 0 <= settings.repeat_fraction <= 0.5:
        raise ConfigError(f"`repeat_fraction` must be in [0, 0.5], got {settings.repeat_fraction}")
    store = LabelStore(folder)
    recorded = store.settings()
    wanted = asdict(settings)
    if recorded is not None and recorded != wanted:
        changed = ", ".join(f"`{k}` {recorded.get(k)!r} → {v!r}" for k, v in wanted.items() if recorded.get(k) != v)
        raise ConfigError(
            f"{str(store.folder)!r} holds a collection made with other settings ({changed}); use another `--out` "
            "or the same settings"
        )
    store.save_settings(wanted)
    rows = _generate(store.folder, settings, batch_size)
    store.add_candidates(rows)
    if not store.has_pairs():
        store.add_pairs(plan_pairs(store.candidates(), settings.repeat_fraction, settings.seed))
    return store


def _generate(folder: Path, s: CollectSettings, batch_size: int) -> list[tuple[int, str, int, str, float | None]]:
    from diffalign.evaluation.generate import generate_images, load_pipeline
    from diffalign.evaluation.prompts import load_prompts

    prompt_set = load_prompts(s.prompts)
    items = prompt_set.items[: s.max_prompts] if s.max_prompts else prompt_set.items
    prompt_set = type(prompt_set)(prompt_set.name, tuple(items))
    seeds = [s.seed + k for k in range(s.per_prompt)]
    images = folder / "images"
    expected = {(i, k): images / f"seed{k}" / item.image_name() for k in seeds for i, item in enumerate(items)}
    if all(p.is_file() for p in expected.values()):
        paths = expected
        logger.info("collect: reusing all %d candidates in %s", len(paths), images)
    else:
        pipe = load_pipeline(s.model, lora=s.lora)
        paths = generate_images(pipe, prompt_set, seeds, images, s.num_inference_steps, s.guidance_scale,
                                s.resolution, batch_size, desc="candidates")  # fmt: skip
    rewards = _score(s.reward, paths, items) if s.reward else {}
    return [
        (i, items[i].text, seed, path.relative_to(folder).as_posix(), rewards.get((i, seed)))
        for (i, seed), path in sorted(paths.items())
    ]


def _score(spec: str, paths: dict, items) -> dict[tuple[int, int], float]:
    from diffalign.evaluation.run import score_files
    from diffalign.rewards import create

    keys = sorted(paths)
    scores = score_files(create(spec), [paths[k] for k in keys], [items[i].text for i, _ in keys], "reward")
    return {k: float(v) for k, v in zip(keys, scores)}


def plan_pairs(candidates, repeat_fraction: float, seed: int) -> list[tuple[int, int, int | None, float]]:
    """All pairs within each prompt, in a seeded random order with random sides, plus `repeat_fraction` of them
    (at least one when there are ≥ 4 pairs) again later with the sides swapped. Rows: `(left id, right id,
    repeat_of, position)`; `repeat_of` is the index of the original in the returned list + 1 (its pair id in a fresh
    table)."""
    rng = random.Random(seed)
    by_prompt: dict[int, list[int]] = {}
    for row in candidates:
        by_prompt.setdefault(row["prompt_index"], []).append(row["id"])
    pairs = [pair for ids in by_prompt.values() for pair in combinations(ids, 2)]
    rng.shuffle(pairs)
    rows = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    n = len(rows)
    planned: list[tuple[int, int, int | None, float]] = [(a, b, None, float(i)) for i, (a, b) in enumerate(rows)]
    n_repeats = min(n, max(1 if n >= 4 else 0, round(repeat_fraction * n))) if repeat_fraction > 0 else 0
    for original in sorted(rng.sample(range(n), n_repeats)):
        later = original + max(2, n // 2) + 0.5  # far enough that the first answer is not on screen
        a, b = rows[original]
        planned.append((b, a, original + 1, min(later, n - 0.5)))
    return planned
