"""`diffalign collect serve|export` (only typer is imported here; the web stack loads when a command runs)."""

from __future__ import annotations

import secrets
from pathlib import Path

import typer

collect_app = typer.Typer(help="Collect your own preference labels in a local web page.", no_args_is_help=True)


@collect_app.command("serve")
def serve_command(
    model: str = typer.Option(..., "--model", help="pipeline folder, hub id, or `toy`"),
    prompts: str = typer.Option(..., "--prompts", help="prompt file (txt/json/jsonl/csv/parquet) or `toy:train`"),
    out: Path = typer.Option(..., "--out", help="collection folder (images, labels.sqlite, exports)"),
    lora: str | None = typer.Option(None, "--lora", help="LoRA to sample with (folder or .safetensors)"),
    max_prompts: int | None = typer.Option(None, "--max_prompts", help="use the first N prompts"),
    per_prompt: int = typer.Option(2, "--per_prompt", help="candidates per prompt (K ≥ 2; all K(K-1)/2 pairs)"),
    seed: int = typer.Option(0, "--seed", help="candidate k of every prompt starts from seed + k"),
    steps: int | None = typer.Option(None, "--steps", help="sampler steps (default: the model's own)"),
    guidance_scale: float | None = typer.Option(None, "--guidance_scale", help="CFG (default: the model's own)"),
    resolution: int | None = typer.Option(None, "--resolution", help="image size (default: the model's)"),
    repeat_fraction: float = typer.Option(0.05, "--repeat_fraction", help="pairs shown again, sides swapped"),
    reward: str | None = typer.Option(None, "--reward", help="score candidates to report agreement (e.g. `toy`)"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on (beyond localhost: token needed)"),
    port: int = typer.Option(8765, "--port"),
    token: str | None = typer.Option(None, "--token", help="access token (generated when --host is not local)"),
) -> None:
    """Generate K candidates per prompt (resumable), then serve the labelling page until Ctrl-C."""
    from diffalign.evaluation.generate import sampling_defaults
    from diffalign.optional import require

    require("fastapi", "`diffalign collect serve`")
    uvicorn = require("uvicorn", "`diffalign collect serve`")

    from .app import LOCAL_HOSTS, create_app
    from .candidates import CollectSettings, prepare

    defaults = sampling_defaults(model)
    settings = CollectSettings(
        model=model, lora=lora, prompts=prompts, max_prompts=max_prompts, per_prompt=per_prompt, seed=seed,
        num_inference_steps=steps or defaults["num_inference_steps"],
        guidance_scale=guidance_scale if guidance_scale is not None else defaults["guidance_scale"],
        resolution=resolution, repeat_fraction=repeat_fraction, reward=reward,
    )  # fmt: skip
    store = prepare(out, settings)
    if token is None and host not in LOCAL_HOSTS:
        token = secrets.token_urlsafe(16)
    progress = store.progress("anonymous")
    query = f"?token={token}&labeller=NAME" if token else "?labeller=NAME"
    typer.echo(f"{progress['pairs']} pairs in {out}; label at http://{host}:{port}/{query} (NAME records who "
               "labels; Ctrl-C stops, the same command resumes)")  # fmt: skip
    uvicorn.run(create_app(out, token=token), host=host, port=port, log_level="warning")


@collect_app.command("export")
def export_command(folder: Path = typer.Argument(..., help="the collection folder given to `serve --out`")) -> None:
    """Write preferences.parquet (Pick-a-Pic v2 schema), kto.parquet and export_summary.json."""
    from .export import export

    summary = export(folder)
    q = summary["quality"]

    def rate(metric: dict) -> str:
        return "—" if metric["rate"] is None else f"{metric['rate']:.2f} (n={metric['n']})"

    typer.echo(f"{summary['preference_rows']} preference rows, {summary['kto_rows']} KTO rows from "
               f"{sum(summary['labels'].values())} labels by {', '.join(summary['labellers']) or 'nobody'}; "
               f"agreement between labellers {rate(q['inter_labeller_agreement'])}, self-consistency "
               f"{rate(q['self_consistency'])}, with the reward {rate(q['reward_agreement'])}")  # fmt: skip
    typer.echo(f"train: {summary['train']}")
