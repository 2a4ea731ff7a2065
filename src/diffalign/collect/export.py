"""`diffalign collect export DIR`: the labels as training tables the trainers read.

- `DIR/preferences.parquet` — Pick-a-Pic v2 columns: `caption`, `jpg_0`, `jpg_1` (PNG bytes: left, right),
  `label_0`, `label_1` (1/0 left better, 0/1 right better, 0.5/0.5 a tie — kept as a tie; every pairwise trainer
  drops and counts ties), plus `labeller`, `created_at` (UTC ISO time), `pair_id`, `seed_0`, `seed_1`. One row per
  label, so two labellers give two rows, as in Pick-a-Pic. Repeats (the self-consistency pairs) are left out.
- `DIR/kto.parquet` — per-image labels for Diffusion-KTO: `image`, `caption`, `desirable` (the chosen image
  desirable, the other undesirable; "both bad" makes both undesirable; ties and skips give nothing).
- `DIR/export_summary.json` — counts, the quality metrics (`collect.quality`) and the command to train on it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from .quality import quality
from .store import DB_FILE, LabelStore

LABELS = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5)}


def export(folder: str | Path) -> dict:
    """Write the three files; returns the summary."""
    import pandas as pd

    folder = Path(folder)
    if not (folder / DB_FILE).is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {DB_FILE}: run `diffalign collect serve --out {folder}`")
    store = LabelStore(folder)
    labels = store.labelled()
    cache: dict[str, bytes] = {}

    def png(name: str) -> bytes:
        if name not in cache:
            cache[name] = (folder / name).read_bytes()
        return cache[name]

    pairs, kto = [], []
    counts = {choice: 0 for choice in ("left", "right", "tie", "both_bad", "skip")}
    for row in labels:
        counts[row["choice"]] += 1
        if row["repeat_of"] is not None:
            continue
        when = datetime.fromtimestamp(row["created_at"], tz=timezone.utc).isoformat()
        if row["choice"] in LABELS:
            label_0, label_1 = LABELS[row["choice"]]
            left, right = png(row["left_image"]), png(row["right_image"])
            pairs.append({"caption": row["prompt"], "jpg_0": left, "jpg_1": right, "label_0": label_0,
                          "label_1": label_1, "labeller": row["labeller"], "created_at": when,
                          "pair_id": row["pair_id"], "seed_0": row["left_seed"],
                          "seed_1": row["right_seed"]})  # fmt: skip
        flags = {"left": (True, False), "right": (False, True), "both_bad": (False, False)}.get(row["choice"])
        if flags is not None:
            for image, desirable in zip((row["left_image"], row["right_image"]), flags):
                kto.append({"image": png(image), "caption": row["prompt"], "desirable": desirable,
                            "labeller": row["labeller"], "created_at": when})  # fmt: skip
    pair_columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "labeller", "created_at", "pair_id", "seed_0",
                    "seed_1"]  # fmt: skip
    pd.DataFrame(pairs, columns=pair_columns).to_parquet(folder / "preferences.parquet", index=False)
    kto_columns = ["image", "caption", "desirable", "labeller", "created_at"]
    pd.DataFrame(kto, columns=kto_columns).to_parquet(folder / "kto.parquet", index=False)
    model = (store.settings() or {}).get("model", "MODEL")
    summary = {
        "labels": counts,
        "labellers": sorted({row["labeller"] for row in labels}),
        "preference_rows": len(pairs),
        "kto_rows": len(kto),
        "quality": quality(labels),
        "train": f"diffalign train dpo --model {model} --data {folder / 'preferences.parquet'} "
        f"--output_dir runs/collected-dpo",
        "train_kto": f"diffalign train kto --model {model} --data {folder / 'kto.parquet'} "
        f"--output_dir runs/collected-kto",
    }
    (folder / "export_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
