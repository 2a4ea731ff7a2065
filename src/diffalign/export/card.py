"""Model card (`README.md`) for an exported run, written with huggingface_hub's `ModelCard` / `ModelCardData`."""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.export.runs import RunWeights

PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
HYPERPARAMETERS = ("beta", "lora_rank", "lora_alpha", "learning_rate", "batch_size", "gradient_accumulation_steps",
                   "max_steps", "resolution", "mixed_precision", "seed")  # fmt: skip


def build_card(run: RunWeights, kind: str, repo_id: str | None = None, files: dict[str, str] | None = None):
    """A `ModelCard` for `run` exported as `kind` (`"diffusers"`, `"lora"`): metadata (base model, tags, library),
    method, data, hyperparameters, the eval table from `results.json` when the run has one, and usage for diffusers,
    ComfyUI and AUTOMATIC1111/Forge. `files` names extra exported files (e.g. `{"kohya": "x.safetensors"}`)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=run.base if "/" in run.base and not Path(run.base).exists() else None,
        library_name="diffusers",
        tags=["diffalign", run.method or "preference-alignment", run.family, "text-to-image"]
        + (["lora"] if run.lora else []),
        pipeline_tag="text-to-image",
    )
    sections = [
        f"# {repo_id or run.run_dir.name}\n",
        f"Fine-tuned with diffalign — method **{run.method or 'unknown'}**"
        f"{' (negative adapter δ)' if run.is_negative else ''}, from base model `{run.base}`"
        f" ({run.family}), {run.step if run.step is not None else '?'} optimizer steps.\n",
        f"Training data: `{run.config.get('data', '?')}`.\n",
        "## Hyperparameters\n\n| key | value |\n|---|---|\n"
        + "\n".join(f"| {k} | {run.config[k]} |" for k in HYPERPARAMETERS if run.config.get(k) is not None)
        + "\n",
        _eval_table(run),
        _usage(run, kind, repo_id, files or {}),
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(s for s in sections if s)
    return ModelCard(content)


def _eval_table(run: RunWeights) -> str:
    for path in (run.run_dir / "results.json", run.run_dir / "eval" / "results.json", run.source / "results.json"):
        if path.is_file():
            results = json.loads(path.read_text())
            rows = [
                f"| {model} | {reward} | {s.get('mean', float('nan')):.4g} | {s.get('std', float('nan')):.2g} |"
                for model, per_reward in results.get("models", {}).items()
                for reward, s in per_reward.items()
            ]
            return "## Evaluation\n\n| model | reward | mean | std |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    return ""


def _usage(run: RunWeights, kind: str, repo_id: str | None, files: dict[str, str]) -> str:
    where = repo_id or "PATH/TO/THIS/FOLDER"
    pipeline = PIPELINES[run.family]
    if kind == "diffusers":
        code = f'pipe = {pipeline}.from_pretrained("{where}")'
    elif run.is_negative:
        code = (
            f'pipe = {pipeline}.from_pretrained("{run.base}")\n'
            "from diffalign.guidance import attach_negative_adapter\n"
            f'attach_negative_adapter(pipe, "{where}", beta=1.0)  # δ only in the unconditional CFG branch'
        )
    else:
        code = f'pipe = {pipeline}.from_pretrained("{run.base}")\npipe.load_lora_weights("{where}")'
    text = (
        "## Usage\n\n### diffusers\n\n```python\nimport torch\n"
        f"from diffusers import {pipeline}\n\n{code}\n"
        'image = pipe("a photo of a cat", guidance_scale=7.5).images[0]\n```\n'
    )
    if "kohya" in files:
        text += (
            f"\n### ComfyUI / AUTOMATIC1111 / Forge\n\n`{files['kohya']}` is a kohya-format LoRA: put it in "
            "`ComfyUI/models/loras` (LoraLoader node) or `stable-diffusion-webui/models/Lora` "
            f"(prompt `<lora:{Path(files['kohya']).stem}:1>`).\n"
        )
    if "single-file" in files:
        text += (
            f"\n### Single file\n\n`{files['single-file']}` is an original-layout checkpoint (checkpoints folder).\n"
        )
    if run.is_negative:
        text += (
            "\n**This is a negative adapter (NPO / Self-NPO)**: it belongs in the unconditional branch of "
            "classifier-free guidance only; loading it as an ordinary LoRA applies it to both branches.\n"
        )
    return text


def write_card(run: RunWeights, folder: str | Path, kind: str, repo_id: str | None = None, files=None) -> Path:
    """Write `README.md` into `folder`; returns its path."""
    path = Path(folder) / "README.md"
    build_card(run, kind, repo_id, files).save(path)
    return path
