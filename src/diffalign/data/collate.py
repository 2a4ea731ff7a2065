"""Batching dataset items, dropping the ones that could not be decoded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """`collate_fn` for every diffalign dataset.

    `None` items (undecodable images) are dropped and counted in `"skipped"`; `"kept"` lists the positions (in
    `items`) of the samples that remain, so per-sample randomness stays attached to the right sample. Tensors are
    stacked (a new batch dim), nested dicts of tensors (cached text embeddings) are stacked per key, `bool` →
    `BoolTensor` (`desirable`), `int` → `LongTensor` (`row`), `float` → `FloatTensor`, anything else (captions) → a
    list.

    Returns:
        `dict`: the batch plus `"skipped"` (`int`) and `"kept"` (`list[int]`). If every item was `None` the batch is
        just `{"skipped": n, "kept": []}`.
    """
    kept = [item for item in items if item is not None]
    batch = _collate_dicts(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    batch["kept"] = [i for i, item in enumerate(items) if item is not None]
    return batch


def _collate_dicts(items: list[dict[str, Any]]) -> dict[str, Any]:
    keys = items[0].keys()
    for item in items[1:]:
        if item.keys() != keys:
            raise KeyError(f"cannot collate items with different keys: {sorted(keys)} vs {sorted(item.keys())}")
    return {key: _collate_values([item[key] for item in items]) for key in keys}


def _collate_values(values: list[Any]) -> Any:
    first = values[0]
    if torch.is_tensor(first):
        return torch.stack(values)
    if isinstance(first, dict):
        return _collate_dicts(values)
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.long)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)
