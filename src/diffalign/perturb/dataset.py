"""`perturb_dataset`: an image–caption table in, a TPO JSONL out (one line per (row, perturbation)).

The output is read by the TPO trainers as it is (`CaptionedImages(out, extra_columns=("mismatched_caption",))`):

    {"image": "photos/0001.jpg", "caption": "a red cat", "mismatched_caption": "a blue cat",
     "edit_kind": "attribute", "edit": "colour: red -> blue", "source_row": 0}

`image` is a path relative to the JSONL's folder when the image lies under it (the data layer resolves it against
that folder), absolute otherwise; images stored as bytes in the source (parquet, arrow) are written once to
`<out stem>_images/` next to the JSONL.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from diffalign.data import DataError, load_table, require_columns
from diffalign.data.base import empty_caption
from diffalign.data.images import DECODE_ERRORS, image_bytes
from diffalign.data.tables import source_root

from .base import Perturber
from .rules import RulePerturber

logger = logging.getLogger(__name__)

_CHUNK = 256


def perturb_dataset(
    data: str | Path,
    out: str | Path,
    perturber: Perturber | None = None,
    seed: int = 0,
    per_caption: int = 1,
    caption_column: str = "caption",
    image_column: str = "image",
    split: str | None = None,
) -> dict[str, Any]:
    """Pair every caption of `data` with `per_caption` mismatched captions and write them to `out` (JSONL).

    Args:
        data (`str` or `Path`): anything [`~diffalign.data.load_table`] reads with a caption and an image column
            (an HF imagefolder with `metadata.jsonl`, parquet, arrow, JSONL, …).
        out (`str` or `Path`): the `.jsonl` file to write (replaced atomically). Statistics go to
            `<out stem>.stats.json` beside it.
        perturber (`Perturber`, *optional*): defaults to `RulePerturber()` (offline, all edit kinds).
        seed (`int`, *optional*, defaults to 0): the draw of row `r` depends only on `(seed, r, caption)`.
        per_caption (`int`, *optional*, defaults to 1): distinct mismatched captions per row (fewer when the caption
            allows fewer; such rows are counted in `short`).
        caption_column, image_column (`str`, *optional*): column names in `data`.
        split (`str`, *optional*): passed to `load_table`.

    Returns:
        `dict`: `rows`, `written` (JSONL lines), `kept_rows`, `bad_caption`, `bad_image` (missing/undecodable),
        `no_edit` (no perturbation applies), `short`, and `kinds` (lines per edit kind).

    Raises:
        `DataError`: a column is missing or `out` is not a `.jsonl` path.
    """
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DataError(f"`out` must be a .jsonl file, got {str(out)!r}")
    if per_caption < 1:
        raise DataError(f"`per_caption` must be >= 1, got {per_caption}")
    perturber = perturber or RulePerturber()
    table = load_table(data, split=split)
    require_columns(table, [caption_column, image_column], data)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = _ImageWriter(source_root(data), out.parent.resolve(), out.parent / f"{out.stem}_images")
    stats: dict[str, Any] = dict(rows=len(table), written=0, kept_rows=0, bad_caption=0, bad_image=0, no_edit=0)
    stats["short"] = 0
    kinds: Counter[str] = Counter()
    tmp = out.with_name(f".{out.name}.tmp")
    columns = table.select_columns([caption_column, image_column])
    with open(tmp, "w", encoding="utf-8") as f:
        for start in tqdm(range(0, len(table), _CHUNK), desc="perturb", unit="chunk"):
            chunk = columns[start : start + _CHUNK]
            for offset, (caption, cell) in enumerate(zip(chunk[caption_column], chunk[image_column])):
                row = start + offset
                lines = _row_lines(row, caption, cell, perturber, seed, per_caption, images, stats)
                for line in lines:
                    kinds[line["edit_kind"]] += 1
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    stats["kinds"] = dict(sorted(kinds.items()))
    out.with_name(f"{out.stem}.stats.json").write_text(json.dumps(stats, indent=2))
    logger.info("perturb %s -> %s: %s", data, out, stats)
    return stats


def _row_lines(row, caption, cell, perturber, seed, per_caption, images, stats) -> list[dict[str, Any]]:
    if empty_caption(caption):
        stats["bad_caption"] += 1
        return []
    caption = caption.strip()
    results = perturber.perturb_many(caption, per_caption, seed, row)
    if not results:
        stats["no_edit"] += 1
        return []
    ref = images.reference(cell, row)
    if ref is None:
        stats["bad_image"] += 1
        return []
    stats["kept_rows"] += 1
    stats["short"] += int(len(results) < per_caption)
    stats["written"] += len(results)
    return [
        {
            "image": ref,
            "caption": caption,
            "mismatched_caption": r.mismatched_caption,
            "edit_kind": r.kind,
            "edit": r.edit,
            "source_row": row,
        }
        for r in results
    ]


class _ImageWriter:
    """Turns an image cell into a path the JSONL can hold: a checked existing file, or bytes written to disk."""

    def __init__(self, source_root: Path, out_dir: Path, images_dir: Path) -> None:
        self.source_root = source_root
        self.out_dir = out_dir
        self.images_dir = images_dir

    def reference(self, cell: Any, row: int) -> str | None:
        path = _cell_path(cell, self.source_root)
        try:
            data = image_bytes(cell, self.source_root)
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
                fmt = (image.format or "png").lower()
        except DECODE_ERRORS as err:
            logger.warning("perturb: skipping row %d: undecodable image (%s)", row, err)
            return None
        if path is None:  # bytes in the table: write them once
            self.images_dir.mkdir(parents=True, exist_ok=True)
            path = (self.images_dir / f"{row:08d}.{'jpg' if fmt == 'jpeg' else fmt}").resolve()
            path.write_bytes(data)
        return _relative_if_inside(path, self.out_dir)


def _cell_path(cell: Any, root: Path) -> Path | None:
    """The file a cell points to (resolved), or `None` when the cell holds the bytes itself."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return None
        cell = cell.get("path")
    if isinstance(cell, (str, Path)) and str(cell):
        path = Path(cell).expanduser()
        return (path if path.is_absolute() else root / path).resolve()
    return None


def _relative_if_inside(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def build_perturber(
    kinds: str | Sequence[str] | None = None,
    vocabulary: str | Path | Iterable[str] | None = None,
    llm: str | None = None,
) -> Perturber:
    """The perturber the CLI flags describe.

    Args:
        kinds (`str` or `Sequence[str]`, *optional*): edit kinds, a comma list or a sequence (rules:
            `object,attribute,count,spatial,context`; LLM: `content,attribute,spatial,context`). Default: all.
        vocabulary (`str`, `Path` or `Iterable[str]`, *optional*): replacement words allowed (rules only): a text
            file of words separated by spaces/newlines, `"toy"` for the toy world's vocabulary, or the words.
        llm (`str`, *optional*): a local transformers causal-LM folder; `None` = the offline rule perturber.

    Raises:
        `ConfigError`: unknown kinds, or a vocabulary given together with `llm`.
    """
    from diffalign.config import ConfigError

    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    try:
        if llm is not None:
            if vocabulary is not None:
                raise ValueError("`vocabulary` only restricts the rule perturber; drop it or drop `llm`")
            from .llm import LLMPerturber

            return LLMPerturber(llm, kinds=kinds)
        return RulePerturber(kinds=kinds, vocabulary=_read_vocabulary(vocabulary))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _read_vocabulary(vocabulary: str | Path | Iterable[str] | None) -> list[str] | None:
    if vocabulary is None:
        return None
    if isinstance(vocabulary, (str, Path)):
        path = Path(vocabulary).expanduser()
        if not path.is_file():
            from diffalign import plugins

            words = plugins.load("vocabularies", str(vocabulary))
            if words is not None:
                return list(words())
            known = ", ".join(plugins.names("vocabularies")) or "none installed"
            raise FileNotFoundError(
                f"`vocabulary` {str(path)!r} is neither a word-list file nor a vocabulary plug-in ({known})"
            )
        return path.read_text(encoding="utf-8").split()
    return list(vocabulary)
