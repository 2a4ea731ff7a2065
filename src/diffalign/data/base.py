"""What every diffalign dataset shares: keyed access, deterministic transforms, and bad-row accounting.

A dataset is indexed by a key `(epoch, index)` (a plain `int` means epoch 0). `index` addresses the dataset's own list
of kept samples; the random crop/flip is drawn from a generator seeded with `(seed, epoch, index)`, so a key always
yields the same sample — in any DataLoader worker and after a resume. Subclasses only say, through `sample(index)`,
which table cells make up a sample; `__getitem__` decodes and transforms them.

Bad rows never crash a run: rows with a missing caption or invalid label are dropped when the index is built
(counted in `stats`), and an image that cannot be decoded makes its item `None` (counted in `stats["undecodable"]`,
logged once per row with the source and row index; [`~diffalign.data.collate`] drops it). With DataLoader workers,
each worker keeps its own `stats` copy, so the main process's `undecodable` count only covers items it decoded itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .images import DECODE_ERRORS, open_image
from .tables import source_root
from .transforms import Key, check_resolution, generator_for, preprocess, sample_params, split_key

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """The raw cells of one sample before decoding.

    Attributes:
        images (`dict[str, tuple[str, Any]]`): slot suffix (`"_w"`, `"_l"` or `""`) → `(column, cell)`.
        caption (`str`): the caption.
        row (`int`): the table row the sample comes from (for logs and debugging).
        extra (`dict`): further item fields, e.g. `{"desirable": True}`.
    """

    images: dict[str, tuple[str, Any]]
    caption: str
    row: int
    extra: dict[str, Any] = field(default_factory=dict)


class KeyedDataset(Dataset):
    """Base class: turns `sample(index)` into transformed items. See the module docstring.

    Subclasses set `self._index` (a sequence of kept samples), `self.stats` and implement `sample(index)`.
    """

    image_slots: tuple[str, ...] = ("",)

    def __init__(
        self,
        source: str | Path,
        resolution: int | None = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        resample: str = "bicubic",
    ) -> None:
        self.source = str(source)
        self.root = source_root(source)
        self.resolution = check_resolution(resolution) if resolution is not None else None
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.resample = resample
        self.stats: dict[str, int] = {}
        self._bad_rows: set[int] = set()
        self._index: Any = ()

    def __len__(self) -> int:
        return len(self._index)

    def sample(self, index: int) -> Sample:
        raise NotImplementedError

    def __getitem__(self, key: Key) -> dict[str, Any] | None:
        epoch, index = split_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        params = sample_params(generator_for(self.seed, epoch, index), self.center_crop, self.random_flip)
        sample = self.sample(index)
        item: dict[str, Any] = {"caption": sample.caption, **sample.extra, "row": sample.row}
        for slot, (column, cell) in sample.images.items():
            image = self.load_image(cell, sample.row, column)
            if image is None:
                return None
            processed = preprocess(image, self.resolution, params, self.resample)
            item[f"pixels{slot}"] = processed.pixels
            item[f"original_size{slot}"] = processed.original_size
            item[f"crop_top_left{slot}"] = processed.crop_top_left
        return item

    def load_image(self, cell: Any, row: int, column: str) -> Image.Image | None:
        """Decode one cell; on failure warn once for the row, count it in `stats["undecodable"]`, return `None`."""
        try:
            return open_image(cell, self.root)
        except DECODE_ERRORS as err:
            self.mark_undecodable(row, column, err)
            return None

    def mark_undecodable(self, row: int, column: str, err: Exception | str) -> None:
        if row in self._bad_rows:
            return
        self._bad_rows.add(row)
        self.stats["undecodable"] = len(self._bad_rows)
        if getattr(self, "first_undecodable", None) is None:
            self.first_undecodable = (row, column)
        logger.warning("%s: skipping row %d, column %r: undecodable image (%s)", self.source, row, column, err)


SKIPPED_ROW_EXAMPLES = 5


def note_skip(skipped_rows: dict[str, list[int]] | None, reason: str, row: int) -> None:
    """Remember the first few table rows skipped for `reason` (they are named in the summary log)."""
    if skipped_rows is not None and len(skipped_rows.setdefault(reason, [])) < SKIPPED_ROW_EXAMPLES:
        skipped_rows[reason].append(row)


def log_summary(
    name: str, source: str, stats: dict[str, int], skipped_rows: dict[str, list[int]] | None = None
) -> None:
    """`PreferencePairs(data.parquet): 10 rows -> 7 kept (bad_label=2 (rows 3, 8), bad_caption=1 (row 5), …)`."""
    parts = []
    for key, value in stats.items():
        if key in ("rows", "kept"):
            continue
        rows = (skipped_rows or {}).get(key, [])
        more = ", …" if value > len(rows) else ""
        where = f" (row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}{more})" if rows else ""
        parts.append(f"{key}={value}{where}")
    logger.info("%s(%s): %d rows -> %d kept (%s)", name, source, stats["rows"], stats["kept"], ", ".join(parts))


def empty_caption(caption: Any) -> bool:
    return not isinstance(caption, str) or not caption.strip()
