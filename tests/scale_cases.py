"""One tiny training case per method, shared by the single-process and the 2-process (`accelerate launch`) scale
tests: data writers, configs, and the comparison of trained weights.

`run(method, model, data, out, batch_size, ga)` trains ONE optimizer step over a global batch of 4 with
`adam_epsilon=1` and `lr=1`, so the first Adam update is ≈ −g and the saved weights compare the gradients themselves.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from helpers import png_bytes, tiny_config  # noqa: E402

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40), (200, 40, 200), (40, 210, 210)]
WORDS = ["red", "green", "blue", "yellow", "pink", "white"]
METHODS = ("dpo", "kto", "npo", "self-npo", "smpo", "tdpo", "tkto")
REL_TOL = 1e-4  # relative, on every trained tensor (max |a − b| ≤ REL_TOL · max |a|)


def _png(colour, size=20) -> bytes:
    return png_bytes(colour, size)


def write_data(root: str | Path) -> dict[str, str]:
    """Eight rows of each kind of data the methods read; returns `{method: data path}`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pairs, captions, tpo = [], [], []
    for i in range(8):
        a, b = i % 6, (i + 1) % 6
        pairs.append({"caption": f"a {WORDS[a]} square", "jpg_0": _png(COLOURS[a]), "jpg_1": _png(COLOURS[b]),
                      "label_0": 1.0 if i % 2 == 0 else 0.0, "label_1": 0.0 if i % 2 == 0 else 1.0,
                      "score_0": 20.0 + 0.5 * i, "score_1": 21.0 - 0.25 * i})  # fmt: skip
        captions.append(f"a {WORDS[a]} circle on a {WORDS[b]} background")
        Image.open(io.BytesIO(_png(COLOURS[a]))).save(root / f"img{i}.png")
        tpo.append({"caption": f"a {WORDS[a]} square", "mismatched_caption": f"a {WORDS[b]} square",
                    "image": f"img{i}.png"})  # fmt: skip
    pd.DataFrame(pairs).to_parquet(root / "pairs.parquet")
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    (root / "tpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tpo))
    paths = {"pairs": root / "pairs.parquet", "captions": root / "captions.txt", "tpo": root / "tpo.jsonl"}
    source = {"dpo": "pairs", "kto": "pairs", "npo": "pairs", "smpo": "pairs", "self-npo": "captions",
              "tdpo": "tpo", "tkto": "tpo"}  # fmt: skip
    return {m: str(paths[source[m]]) for m in METHODS}


EXTRA = {"smpo": {"tau": 1.0, "inversion_steps": 2}, "self-npo": {"num_grid_steps": 4, "truncation_steps": 2}}


def config(method: str, model, data, out, batch_size: int, ga: int, **kw):
    from diffalign.trainers import get_trainer

    cls = get_trainer(method)
    values = {"resolution": 16, "beta": 50.0, "batch_size": batch_size, "gradient_accumulation_steps": ga,
              "max_steps": 1, "learning_rate": 1.0, "adam_epsilon": 1.0, **EXTRA.get(method, {}), **kw}  # fmt: skip
    if method == "self-npo":
        values.pop("beta")
    return tiny_config(cls, model, data, out, **values)


def _ahead(cls):
    """`cls` with its policy errors lowered by 10 % of the reference's: r − m > 0, so KTO's reference point
    kl = clamp(mean(r − m), 0) is positive and differs between micro-batches (at step 1 policy = reference and it
    would be 0 at any layout, testing nothing)."""

    class Ahead(cls):
        def errors(self, x_t, t, cond, target):
            model_err, ref_err = super().errors(x_t, t, cond, target)
            return model_err - 0.1 * ref_err, ref_err

    return Ahead


def trainer_class(method: str):
    from diffalign.trainers import get_trainer

    cls = get_trainer(method)
    return _ahead(cls) if method in ("kto", "tkto") else cls


def run(method: str, model, data, out, batch_size: int, ga: int, **kw) -> Path:
    return trainer_class(method)(config(method, model, data, out, batch_size, ga, **kw)).train()


def trained(out: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors in `out/final/` (LoRA file, or a negative adapter file)."""
    files = sorted(Path(out, "final").glob("*.safetensors"))
    assert files, f"no weights in {out}/final"
    out_tensors = {}
    for f in files:
        out_tensors |= {f"{f.name}:{k}": v for k, v in load_file(f).items()}
    return out_tensors


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        scale = max(a[k].abs().max().item(), 1e-12)
        worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst
