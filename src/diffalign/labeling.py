"""`diffalign label`: score both images of every preference pair with a reward and let the reward decide the winner.

SmPO (Lu et al. 2025) trains on reward-relabelled Pick-a-Pic: the reward (PickScore) picks winner and loser, the
human label only removes pairs the human called a tie, and the two scores give the smoothed preference
p = σ((s_w − s_l)/τ). This module writes that input for any Pick-a-Pic-schema table:

- output = the input rows minus human ties, bad captions and undecodable images, plus `score_0`, `score_1`, and
  `label_0`/`label_1` set by the reward (equal scores → 0.5/0.5, a tie that every trainer drops and counts); the
  human labels are kept as `human_label_0`/`human_label_1`;
- resumable: scores go to `<out>.parts/part-NNNNNN.parquet` chunk by chunk; a rerun with the same settings skips
  finished chunks (the parts are removed once the output is written), and a finished output is reused;
- `<out>.json` holds the settings and counts (`rows`, `scored`, `human_ties_dropped`, `reward_ties`, `reward_flips`,
  `bad_caption`, `undecodable`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffalign.data.base import empty_caption
from diffalign.data.images import DECODE_ERRORS, open_image
from diffalign.data.tables import load_table, read_columns, require_columns, source_root

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label_0", "label_1")


def default_output(source: str | Path, reward_label: str) -> Path:
    """`pairs.parquet` → `pairs_<reward>.parquet` next to it; a folder `data/` → `data/scored_<reward>.parquet`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.with_name(f"{path.stem}_{reward_label}.parquet")
    return path / f"scored_{reward_label}.parquet"


def label_pairs(
    source: str | Path,
    out: str | Path | None = None,
    reward: str | dict[str, Any] = "pickscore",
    *,
    batch_size: int = 32,
    chunk_pairs: int = 1024,
    caption_column: str = "caption",
    split: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score every pair of `source` with `reward` and write the relabelled table to `out` (see the module docstring).

    Args:
        source (`str` or `Path`): a table [`~diffalign.data.load_table`] reads with `caption`, `jpg_0`, `jpg_1`
            (`label_0`/`label_1` optional: without them every pair is scored).
        out (`str` or `Path`, *optional*): output parquet; defaults to `default_output(source, reward label)`.
        reward (`str` or `dict`): a registry name (`"pickscore"`, `"toy"`, …) or a mapping with `name` and the
            factory's arguments (`{"name": "pickscore", "model": "/models/PickScore_v1"}`).
        batch_size (`int`, defaults to 32): pairs per reward call (2 × images).
        chunk_pairs (`int`, defaults to 1024): pairs per resumable part file.
        device, dtype (`str`, *optional*): passed to the reward factory unless the mapping sets them.

    Returns:
        `dict`: the counts and settings also written to `<out>.json`, plus `out`.
    """
    from diffalign.rewards import create, parse_spec

    if batch_size < 1 or chunk_pairs < 1:
        raise ValueError(f"`batch_size` and `chunk_pairs` must be >= 1, got {batch_size} and {chunk_pairs}")
    label, name, kwargs = parse_spec(reward)
    out = Path(out) if out is not None else default_output(source, label)
    settings = {"source": str(Path(source).expanduser().resolve()), "fingerprint": _fingerprint(source)}
    settings["reward"] = {"name": name, **kwargs}
    settings.update(split=split, caption_column=caption_column, chunk_pairs=chunk_pairs)
    summary_path = out.with_name(out.name + ".json")
    if out.is_file() and summary_path.is_file() and json.loads(summary_path.read_text()).get("settings") == settings:
        logger.info("reusing finished labels %s", out)
        return {**json.loads(summary_path.read_text())["stats"], "out": str(out)}

    table = load_table(source, split=split)
    require_columns(table, [caption_column, "jpg_0", "jpg_1"], source)
    todo, stats = _rows_to_score(table, caption_column)
    parts = _prepare_parts(out, settings)
    kwargs = {"device": device, "dtype": dtype, **kwargs} if name != "toy" else {"device": device or "cpu", **kwargs}
    scorer = None
    chunks = [todo[i : i + chunk_pairs] for i in range(0, len(todo), chunk_pairs)]
    bar = tqdm(total=len(todo), desc=f"label ({label})", disable=not show_progress)
    for number, rows in enumerate(chunks):
        part = parts / f"part-{number:06d}.parquet"
        if not part.is_file():
            scorer = scorer or create(name, **kwargs)
            _score_chunk(table, rows, caption_column, scorer, batch_size, source_root(source), part, bar)
        else:
            bar.update(len(rows))
    bar.close()
    stats.update(_write_output(table, parts, out, caption_column))
    summary_path.write_text(json.dumps({"settings": settings, "stats": stats}, indent=2))
    shutil.rmtree(parts)
    logger.info("labelled %s with %s: %s → %s", source, label, stats, out)
    return {**stats, "out": str(out)}


def _fingerprint(source: str | Path) -> list[int]:
    """(file count, total bytes, newest mtime in ns) of the source, so a rewritten source is labelled afresh."""
    path = Path(source).expanduser()
    files = [path] if path.is_file() else [f for f in sorted(path.rglob("*")) if f.is_file()]
    stats = [f.stat() for f in files]
    return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def _rows_to_score(table, caption_column: str) -> tuple[list[int], dict[str, int]]:
    """Rows with a caption that no human called a tie."""
    columns = [caption_column] + [c for c in LABEL_COLUMNS if c in table.column_names]
    cells = read_columns(table, columns)
    labelled = all(c in table.column_names for c in LABEL_COLUMNS)
    stats = {"rows": len(table), "human_ties_dropped": 0, "bad_caption": 0}
    todo = []
    for row, caption in enumerate(cells[caption_column]):
        if labelled and _is_tie(cells["label_0"][row], cells["label_1"][row]):
            stats["human_ties_dropped"] += 1
        elif empty_caption(caption):
            stats["bad_caption"] += 1
        else:
            todo.append(row)
    return todo, stats


def _is_tie(l0: Any, l1: Any) -> bool:
    return isinstance(l0, (int, float)) and isinstance(l1, (int, float)) and float(l0) == float(l1) == 0.5


def _prepare_parts(out: Path, settings: dict) -> Path:
    """The parts folder of `out`; parts written under other settings are discarded (with a warning)."""
    parts = out.with_name(out.name + ".parts")
    record = parts / "settings.json"
    if parts.is_dir() and (not record.is_file() or json.loads(record.read_text()) != settings):
        logger.warning("discarding partial labels in %s: written with other settings", parts)
        shutil.rmtree(parts)
    if parts.is_dir():
        logger.info("resuming labels from %s", parts)
    parts.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings))
    return parts


def _score_chunk(table, rows, caption_column, scorer, batch_size, root, part: Path, bar) -> None:
    """Score `rows` in batches of `batch_size` pairs and write `row, score_0, score_1` (NaN = undecodable)."""
    import pandas as pd

    scores = np.full((len(rows), 2), math.nan)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        cells = table.select_columns([caption_column, "jpg_0", "jpg_1"])[batch]
        images, prompts, where = [], [], []
        for i, row in enumerate(batch):
            pair = _decode_pair(cells["jpg_0"][i], cells["jpg_1"][i], root, row)
            if pair is not None:
                images += pair
                prompts += [cells[caption_column][i]] * 2
                where.append(start + i)
        if where:
            scores[where] = scorer(images, prompts).view(-1, 2).double().numpy()
        bar.update(len(batch))
    tmp = part.with_suffix(".tmp")
    pd.DataFrame({"row": rows, "score_0": scores[:, 0], "score_1": scores[:, 1]}).to_parquet(tmp)
    tmp.rename(part)  # a part exists only when complete


def _decode_pair(cell_0, cell_1, root, row: int):
    try:
        return [open_image(cell_0, root).convert("RGB"), open_image(cell_1, root).convert("RGB")]
    except DECODE_ERRORS as err:
        logger.warning("skipping row %d: undecodable image (%s)", row, err)
        return None


def _write_output(table, parts: Path, out: Path, caption_column: str) -> dict[str, int]:
    """Join the parts onto the table's scored rows, relabel by reward, write `out`; returns the counts."""
    import pandas as pd

    scored = pd.concat([pd.read_parquet(p) for p in sorted(parts.glob("part-*.parquet"))], ignore_index=True)
    ok = scored[scored["score_0"].notna() & scored["score_1"].notna()]
    s0, s1 = ok["score_0"].to_numpy(), ok["score_1"].to_numpy()
    reward_l0 = np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5))
    subset = table.select(ok["row"].tolist())
    stats = {"scored": len(ok), "undecodable": int(len(scored) - len(ok)), "reward_ties": int((s0 == s1).sum())}
    stats["reward_flips"] = 0
    if all(c in table.column_names for c in LABEL_COLUMNS):
        human = np.asarray(read_columns(subset, ["label_0"])["label_0"], dtype=np.float64)
        stats["reward_flips"] = int(((human != reward_l0) & (reward_l0 != 0.5)).sum())
        if all(f"human_{c}" in subset.column_names for c in LABEL_COLUMNS):  # relabelling a labelled table
            subset = subset.remove_columns(list(LABEL_COLUMNS))
        else:
            subset = subset.rename_columns({c: f"human_{c}" for c in LABEL_COLUMNS})
    for name, values in (("score_0", s0), ("score_1", s1), ("label_0", reward_l0), ("label_1", 1.0 - reward_l0)):
        if name in subset.column_names:
            subset = subset.remove_columns(name)
        subset = subset.add_column(name, values.tolist())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    subset.to_parquet(str(tmp))
    tmp.rename(out)
    return stats
