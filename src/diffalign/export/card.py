"""Model cards (huggingface_hub's `ModelCard`) and hub upload for exported runs."""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.export.runs import RunWeights

CARD_TEMPLATE = """---
{card_data}
---

# {title}

Fine-tuned with [diffalign](https://pypi.org/project/diffalign/) using **{method}** from `{base}`.

| key | value |
|---|---|
{table}
{eval_table}
## Use with diffusers

```python
import torch
from diffusers import DiffusionPipeline

{load}
image = pipe("a photo of a cat", num_inference_steps=30).images[0]
```

## Use in ComfyUI / AUTOMATIC1111 / Forge

For a single LoRA file those tools load, export the run with
`diffalign export RUN --format kohya --out {slug}.safetensors` and put it in `models/loras/`
(ComfyUI: a *LoraLoader* node; A1111/Forge: `<lora:{slug}:1>` in the prompt).
"""

KEYS = ("beta", "learning_rate", "lora_rank", "lora_alpha", "batch_size", "gradient_accumulation_steps",
        "max_steps", "resolution", "mixed_precision", "data", "seed")  # fmt: skip


def write_model_card(folder: Path, weights: RunWeights, base: str, family: str, repo_id: str | None = None) -> Path:
    """`folder/README.md`: method, base model, data, key hyper-parameters, the eval table when the run has a
    `results.json`, and usage snippets for diffusers and ComfyUI/A1111."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = weights.config
    data = ModelCardData(
        library_name="diffusers",
        base_model=str(cfg.get("model", base)),
        tags=["diffalign", f"diffusion-{weights.method}", family, "text-to-image"],
        pipeline_tag="text-to-image",
    )
    table = "\n".join(f"| {k} | {cfg[k]} |" for k in KEYS if cfg.get(k) is not None)
    slug = (repo_id or folder.name).split("/")[-1]
    card = ModelCard(
        CARD_TEMPLATE.format(
            card_data=data.to_yaml(),
            title=slug,
            method=weights.method,
            base=cfg.get("model", base),
            table=f"| method | {weights.method} |\n{table}",
            eval_table=_eval_table(weights),
            slug=slug,
            load=_load_snippet(weights, repo_id or str(folder), cfg.get("model", base)),
        )  # fmt: skip
    )
    path = folder / "README.md"
    card.save(str(path))
    return path


def _load_snippet(weights: RunWeights, repo: str, base: str) -> str:
    if weights.lora and weights.full_denoiser is None and not (Path(repo) / "model_index.json").is_file():
        return (f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")\n'
                f'pipe.load_lora_weights("{repo}")')  # fmt: skip
    return f'pipe = DiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.float16).to("cuda")'


def _eval_table(weights: RunWeights) -> str:
    """Win rates from a `results.json` next to the run (written by `diffalign eval` / the demo), if any."""
    for candidate in (weights.source / "results.json", weights.source.parent / "results.json"):
        if candidate.is_file():
            results = json.loads(candidate.read_text())
            rows = [f"| {cmp} | {reward} | {v['win_rate']:.3f} | {v.get('n', '')} |"
                    for cmp, per in results.get("win_rates", {}).items() for reward, v in per.items()]  # fmt: skip
            if rows:
                return "\n## Evaluation\n\n| comparison | reward | win rate | n |\n|---|---|---|---|\n" + "\n".join(
                    rows
                )
    return ""


def push_to_hub(folder: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload `folder` with huggingface_hub's API; returns the repo URL. Offline
    (`HF_HUB_OFFLINE=1`) it fails at once with one line instead of hanging."""
    from huggingface_hub import HfApi

    from diffalign.backbones.base import hub_offline
    from diffalign.config import ConfigError

    if hub_offline():
        raise ConfigError(f"cannot push to the Hub repo {repo_id!r}: HF_HUB_OFFLINE is set (the folder is {folder})")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="diffalign export")
    return f"https://huggingface.co/{repo_id}"
