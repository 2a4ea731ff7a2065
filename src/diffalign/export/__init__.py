"""Use a run's result everywhere: kohya LoRAs (ComfyUI, AUTOMATIC1111, Forge), diffusers pipeline folders,
original-layout single-file checkpoints, model cards and Hub upload.

>>> from diffalign.export import export_run
>>> export_run("runs/dpo", "kohya", "dpo_lora.safetensors")          # ComfyUI / A1111 / Forge LoRA
>>> export_run("runs/dpo", "diffusers", "dpo_pipeline")              # LoRA fused; from_pretrained(folder)
>>> export_run("runs/dpo", "single-file", "dpo.safetensors")         # checkpoints folder of any UI
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffalign.export.runs import LORA_FILE, RunWeights, load_run

FORMATS = ("kohya", "diffusers", "single-file", "lora")
DEFAULT_DTYPE = {"kohya": "fp16", "single-file": "fp16", "diffusers": "fp32", "lora": "fp32"}
"""kohya LoRAs and UI checkpoints are shared in fp16 (what the UIs load); pipeline folders keep full precision."""

__all__ = ["FORMATS", "RunWeights", "export_run", "load_run", "publish_run"]


def export_run(
    run: str | Path | RunWeights,
    format: str,
    out: str | Path,
    dtype: str | None = None,
    config: str | Path | None = None,
    method: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Export a run (folder, `final/`, `checkpoint-N/`, or a loaded `RunWeights`) as `format` into `out`.

    `kohya` and `single-file` write one `.safetensors` file; `diffusers` (complete pipeline) and `lora` (the diffusers
    LoRA file alone) write a folder with a model card (`README.md`). Returns the written path.
    """
    from diffalign.config import ConfigError
    from diffalign.export.card import write_card
    from diffalign.export.checkpoint import export_diffusers, export_single_file, parse_dtype
    from diffalign.export.kohya import export_kohya

    if format not in FORMATS:
        raise ConfigError(f"`--format` must be one of {list(FORMATS)}, got {format!r}")
    weights = run if isinstance(run, RunWeights) else load_run(run, config=config, method=method)
    torch_dtype = parse_dtype(dtype or DEFAULT_DTYPE[format])
    if format == "kohya":
        return export_kohya(weights, out, torch_dtype)
    if format == "single-file":
        return export_single_file(weights, out, torch_dtype)
    out = Path(out)
    if format == "diffusers":
        export_diffusers(weights, out, torch_dtype)
        write_card(weights, out, "diffusers", repo_id)
        return out
    if weights.lora is None or not (weights.source / LORA_FILE).is_file():
        raise ConfigError(f"`--format lora` needs a LoRA run with final/{LORA_FILE}; '{weights.source}' has none")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights.source / LORA_FILE, out / LORA_FILE)
    files = {}
    if weights.family in ("sd", "sdxl", "flux"):
        kohya = export_kohya(weights, out / f"{out.name}_kohya.safetensors")
        files["kohya"] = kohya.name
    write_card(weights, out, "lora", repo_id, files)
    return out


def publish_run(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    out: str | Path | None = None,
) -> str:
    """Export a run for the Hub and upload it: a LoRA run as `--format lora` (diffusers file + kohya file + card), a
    full fine-tune as `--format diffusers`. `out` defaults to `<run_dir>/hub`. Returns the repo URL."""
    from diffalign.export.hub import push_to_hub

    weights = load_run(run_dir)
    folder = Path(out) if out else weights.run_dir / "hub"
    export_run(weights, "lora" if weights.lora else "diffusers", folder, repo_id=repo_id)
    return push_to_hub(folder, repo_id, private=private, token=token)
