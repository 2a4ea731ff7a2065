"""Preference data: Pick-a-Pic-style pairs (Diffusion-DPO / NPO / SmPO) and unpaired images (Diffusion-KTO).

Pick-a-Pic v2 schema: `caption`, `jpg_0`, `jpg_1` (encoded images), `label_0`, `label_1` with
`(label_0, label_1)` ∈ {(1, 0), (0, 1), (0.5, 0.5) = tie}. Winner first: if `label_0 == 0` the images are swapped.
Ties are DROPPED and counted (the official Diffusion-DPO code drops them; treating a tie as "image 0 wins", as the
diffusers example scripts do, trains on noise).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .base import KeyedDataset, Sample, empty_caption, log_summary, note_skip
from .tables import DataError, load_table, read_columns, require_columns

PAIR_COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1")
_VALID_LABELS = {0.0, 0.5, 1.0}


def pair_index(
    table, caption_column: str, stats: dict[str, int], skipped_rows: dict[str, list[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scan the caption and label columns (never the images) and keep the valid, non-tie pairs.

    A row is counted, in this order of checks, as `bad_label` (a label missing, not in {0, 0.5, 1}, or
    `label_0 + label_1 != 1`), `ties_dropped` (0.5/0.5), `bad_caption` (missing or blank), or kept.

    `skipped_rows` (optional) collects the first `SKIPPED_ROW_EXAMPLES` row indices of each reason, for the logs.

    Returns:
        `(rows, second_wins)`: the kept table rows (int64) and whether `jpg_1` is the winner (bool).
    """
    cols = read_columns(table, [caption_column, "label_0", "label_1"])
    rows, second_wins = [], []
    for row, (caption, l0, l1) in enumerate(zip(cols[caption_column], cols["label_0"], cols["label_1"])):
        verdict = _classify(caption, l0, l1)
        if verdict is None:
            rows.append(row)
            second_wins.append(float(l0) == 0.0)
        else:
            stats[verdict] += 1
            note_skip(skipped_rows, verdict, row)
    stats["rows"] = len(table)
    return np.asarray(rows, dtype=np.int64), np.asarray(second_wins, dtype=bool)


def _classify(caption: Any, l0: Any, l1: Any) -> str | None:
    if not (_is_label(l0) and _is_label(l1)) or float(l0) + float(l1) != 1.0:
        return "bad_label"
    if float(l0) == 0.5:
        return "ties_dropped"
    if empty_caption(caption):
        return "bad_caption"
    return None


def _is_label(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not math.isnan(value) and float(value) in _VALID_LABELS


class PreferencePairs(KeyedDataset):
    """Pairs of images for one caption, winner first, transformed identically (same flip, same relative crop).

    Args:
        source (`str` or `Path`): any table [`~diffalign.data.load_table`] reads, with the Pick-a-Pic columns.
        resolution (`int`, *optional*, defaults to 512): output side `R` (divisible by 8).
        center_crop (`bool`, *optional*, defaults to `True`): centre crop; `False` = random crop.
        random_flip (`bool`, *optional*, defaults to `False`): horizontal flip with probability 0.5 (both images).
        seed (`int`, *optional*, defaults to 0): seeds the per-key crop/flip generator.
        swap (`bool`, *optional*, defaults to `False`): put the LOSER in the `_w` slot (negative preference, NPO).
        caption_column (`str`, *optional*, defaults to `"caption"`).
        resample (`str`, *optional*, defaults to `"bicubic"`): `"bicubic"` or `"lanczos"`.
        split, cache_dir: passed to [`~diffalign.data.load_table`].

    Items (or `None` when an image cannot be decoded): `pixels_w`, `pixels_l` (`[3, R, R]` in [-1, 1]), `caption`,
    `original_size_w/_l`, `crop_top_left_w/_l` (`LongTensor[2]`), `row` (the table row).

    `stats`: `rows`, `kept`, `ties_dropped`, `bad_caption`, `bad_label`, `undecodable`.
    """

    image_slots = ("_w", "_l")

    def __init__(
        self,
        source: str | Path,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        swap: bool = False,
        caption_column: str = "caption",
        resample: str = "bicubic",
        split: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(source, resolution, center_crop, random_flip, seed, resample)
        self.swap = swap
        self.caption_column = caption_column
        table = load_table(source, split=split, cache_dir=cache_dir)
        require_columns(table, [caption_column, *PAIR_COLUMNS], source)
        self.stats = dict(rows=0, kept=0, ties_dropped=0, bad_caption=0, bad_label=0, undecodable=0)
        self.skipped_rows: dict[str, list[int]] = {}
        self._index, self._second_wins = pair_index(table, caption_column, self.stats, self.skipped_rows)
        self.stats["kept"] = len(self._index)
        self._cells = table.select_columns([caption_column, "jpg_0", "jpg_1"])
        log_summary(type(self).__name__, self.source, self.stats, self.skipped_rows)

    def sample(self, index: int) -> Sample:
        row = int(self._index[index])
        cells = self._cells[row]
        first, second = ("jpg_1", "jpg_0") if self._second_wins[index] else ("jpg_0", "jpg_1")
        if self.swap:
            first, second = second, first
        images = {"_w": (first, cells[first]), "_l": (second, cells[second])}
        return Sample(images, cells[self.caption_column], row)


class UnpairedImages(KeyedDataset):
    """Single images with a desirable/undesirable flag, for Diffusion-KTO.

    Two table schemas are accepted:

    - Pick-a-Pic pairs (`jpg_0`, `jpg_1`, `label_0`, `label_1`): every kept (non-tie) pair gives two items, item
      `2k` = the winner (`desirable=True`) and item `2k + 1` = the loser (`desirable=False`).
    - Unpaired rows: `image_column` + `caption_column` + `desirable` (bool or 0/1) or `label` (0/1); one item per
      row, rows with any other flag value counted as `bad_label`.

    Args are as in [`PreferencePairs`], plus `image_column` (defaults to `"image"`). Items (or `None`): `pixels`,
    `caption`, `desirable` (`bool`), `original_size`, `crop_top_left`, `row`.

    `stats`: `rows`, `kept` (items), `bad_caption`, `bad_label`, `undecodable`, and for pair tables `ties_dropped`.
    """

    def __init__(
        self,
        source: str | Path,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        caption_column: str = "caption",
        image_column: str = "image",
        resample: str = "bicubic",
        split: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(source, resolution, center_crop, random_flip, seed, resample)
        self.caption_column = caption_column
        self.image_column = image_column
        table = load_table(source, split=split, cache_dir=cache_dir)
        self.from_pairs = all(c in table.column_names for c in PAIR_COLUMNS)
        self.stats = dict(rows=0, kept=0, bad_caption=0, bad_label=0, undecodable=0)
        self.skipped_rows: dict[str, list[int]] = {}
        if self.from_pairs:
            self._init_pairs(table)
        else:
            self._init_rows(table)
        log_summary(type(self).__name__, self.source, self.stats, self.skipped_rows)

    def _init_pairs(self, table) -> None:
        require_columns(table, [self.caption_column], self.source)
        self.stats["ties_dropped"] = 0
        rows, second_wins = pair_index(table, self.caption_column, self.stats, self.skipped_rows)
        # item 2k = winner of pair k, item 2k+1 = its loser
        self._index = np.repeat(rows, 2)
        winner_col = np.where(second_wins, 1, 0)
        self._image_col = np.stack([winner_col, 1 - winner_col], axis=1).reshape(-1)
        self._desirable = np.tile(np.array([True, False]), len(rows))
        self.stats["kept"] = len(self._index)
        self._cells = table.select_columns([self.caption_column, "jpg_0", "jpg_1"])

    def _init_rows(self, table) -> None:
        flag = next((c for c in ("desirable", "label") if c in table.column_names), None)
        if flag is None or self.image_column not in table.column_names:
            raise DataError(
                f"data source {self.source!r} must have either the Pick-a-Pic columns {list(PAIR_COLUMNS)} or "
                f"{self.image_column!r} + {self.caption_column!r} + 'desirable' (or 'label'); "
                f"found columns {table.column_names}"
            )
        require_columns(table, [self.caption_column], self.source)
        cols = read_columns(table, [self.caption_column, flag])
        rows, desirable = [], []
        for row, (caption, value) in enumerate(zip(cols[self.caption_column], cols[flag])):
            if value not in (True, False, 0, 1):
                self.stats["bad_label"] += 1
                note_skip(self.skipped_rows, "bad_label", row)
            elif empty_caption(caption):
                self.stats["bad_caption"] += 1
                note_skip(self.skipped_rows, "bad_caption", row)
            else:
                rows.append(row)
                desirable.append(bool(value))
        self.stats["rows"] = len(table)
        self.stats["kept"] = len(rows)
        self._index = np.asarray(rows, dtype=np.int64)
        self._desirable = np.asarray(desirable, dtype=bool)
        self._cells = table.select_columns([self.caption_column, self.image_column])

    @property
    def desirable_flags(self) -> np.ndarray:
        """The `desirable` flag of every item, in index order (bool `[len(self)]`; the KTO weighted sampler's
        classes)."""
        return self._desirable

    def sample(self, index: int) -> Sample:
        row = int(self._index[index])
        cells = self._cells[row]
        column = f"jpg_{self._image_col[index]}" if self.from_pairs else self.image_column
        extra = {"desirable": bool(self._desirable[index])}
        return Sample({"": (column, cells[column])}, cells[self.caption_column], row, extra)
