"""`diffalign` command line: thin wrappers that parse, call one library function, and say where outputs went."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import typer
from typer.core import TyperCommand

from diffalign import __version__
from diffalign.trainers import METHODS

app = typer.Typer(
    name="diffalign",
    help="Align text-to-image diffusion models with human preferences.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Align text-to-image diffusion models with human preferences."""


train_app = typer.Typer(help="Fine-tune a model with one alignment method.", no_args_is_help=True)
app.add_typer(train_app, name="train")

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML preset; any key can be overridden with --key value.")


def _keys_help(config_class) -> str:
    """The config's keys with defaults and help, for `--help` epilogs."""
    lines = []
    for name, field in config_class.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        desc = f" — {field.description}" if field.description else ""
        lines.append(f"--{name} ({default}){desc}")
    return "Config keys (YAML or --key value):\n\n" + "\n\n".join(lines)


class _LazyHelpCommand(TyperCommand):
    """A command whose full `--help` (every config key) is built only when asked for: listing commands must not
    import torch. `full_help` returns the text."""

    full_help: Callable[[], str]

    def format_help(self, ctx, formatter) -> None:
        self.help = type(self).full_help()
        super().format_help(ctx, formatter)


def _lazy_help(full_help: Callable[[], str]) -> type[_LazyHelpCommand]:
    return type("LazyHelp", (_LazyHelpCommand,), {"full_help": staticmethod(full_help)})


def _train_help(method: str) -> str:
    from diffalign.trainers import get_trainer

    cls = get_trainer(method)
    summary = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or method).strip().split("\n\n")[0]
    return " ".join(summary.split()) + "\n\n" + _keys_help(cls.config_class)


def _make_train_command(method: str):
    def command(ctx: typer.Context, config: Path | None = CONFIG_OPTION) -> None:
        from diffalign.config import load_config
        from diffalign.trainers import get_trainer

        cls = get_trainer(method)
        cfg = load_config(cls.config_class, config, ctx.args)
        trainer = cls(cfg)
        final = trainer.train()
        acc = trainer.accelerator  # None for SAIL, whose rounds each have their own
        if acc is None or acc.is_main_process:  # one line per run, not per process
            metrics = getattr(trainer, "metrics_file", Path(cfg.output_dir) / "metrics.jsonl")
            typer.echo(f"final weights: {final}\nmetrics: {metrics}")

    return command


for _method, (*_, _summary) in METHODS.items():
    train_app.command(
        _method, help=_summary, context_settings=EXTRA_ARGS, cls=_lazy_help(partial(_train_help, _method))
    )(_make_train_command(_method))


def _eval_help() -> str:
    from diffalign.evaluation import EvalConfig

    return (eval_command.__doc__ or "") + "\n\n" + _keys_help(EvalConfig)


@app.command("eval", context_settings=EXTRA_ARGS, cls=_lazy_help(lambda: _eval_help()))
def eval_command(ctx: typer.Context, config: Path | None = CONFIG_OPTION) -> None:
    """Generate with paired seeds for each model, score with rewards, write results.json, report.md, grid.png."""
    from diffalign.config import load_config
    from diffalign.evaluation import EvalConfig, run_eval

    cfg = load_config(EvalConfig, config, ctx.args)
    results = run_eval(cfg)
    out = Path(cfg.out)
    for name, per_reward in results["models"].items():
        typer.echo(f"{name}: " + ", ".join(f"{r} {s['mean']:.4g} ± {s['std']:.2g}" for r, s in per_reward.items()))
    typer.echo(f"results: {out / 'results.json'}\nreport: {out / 'report.md'}")


@app.command("score")
def score_command(
    images: Path = typer.Option(..., "--images", help="folder of images named <prompt index>.png (HPSv2: per style)"),
    prompts: str = typer.Option(..., "--prompts", help="prompt file/folder, toy:heldout, pickapic:PATH"),
    rewards: str = typer.Option("toy", "--rewards", help='comma list (hps,pickscore) or YAML: "[{name: hps, ...}]"'),
    out: Path | None = typer.Option(None, "--out", help="where scores.json goes (defaults to --images)"),
    device: str | None = typer.Option(None, "--device", help="cuda / cpu; default: cuda if available"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16 | bf16"),
    batch_size: int = typer.Option(16, "--batch-size", help="images per reward forward pass"),
) -> None:
    """Score images made elsewhere with one or more rewards."""
    import yaml

    from diffalign.evaluation import score_images

    specs = yaml.safe_load(rewards) if rewards.lstrip().startswith("[") else [r.strip() for r in rewards.split(",")]
    result = score_images(images, prompts, specs, out=out, device=device, dtype=dtype, batch_size=batch_size)
    for label, stats in result["rewards"].items():
        typer.echo(f"{label}: {stats['mean']:.4g} ± {stats['std']:.2g} (n={stats['n']})")
    typer.echo(f"scores: {Path(out or images) / 'scores.json'}")


@app.command("perturb")
def perturb_command(
    data: str = typer.Option(..., "--data", help="image-caption data: imagefolder (metadata.jsonl), parquet, JSONL…"),
    out: Path = typer.Option(..., "--out", help="output .jsonl (caption, mismatched_caption, image, edit_kind)"),
    seed: int = typer.Option(0, "--seed", help="the draw for row r depends only on (seed, r, caption)"),
    per_caption: int = typer.Option(1, "--per-caption", help="distinct mismatched captions per row"),
    kinds: str | None = typer.Option(
        None, "--kinds", help="rules: object,attribute,count,spatial,context; --llm: content,attribute,spatial,context"
    ),
    vocabulary: str | None = typer.Option(
        None, "--vocabulary", help="allowed replacement words (rules): a word-list file, or `toy`"
    ),
    llm: str | None = typer.Option(None, "--llm", help="local transformers causal-LM folder (default: offline rules)"),
    caption_column: str = typer.Option("caption", "--caption-column"),
    image_column: str = typer.Option("image", "--image-column"),
    split: str | None = typer.Option(None, "--split", help="split to read when the data holds several"),
) -> None:
    """TPO data: pair every caption with a mismatched one (offline rules or a local LLM), for `train tdpo|tkto`."""
    from diffalign.perturb import build_perturber, perturb_dataset

    perturber = build_perturber(kinds=kinds, vocabulary=vocabulary, llm=llm)
    stats = perturb_dataset(
        data, out, perturber, seed=seed, per_caption=per_caption, caption_column=caption_column,
        image_column=image_column, split=split,
    )  # fmt: skip
    skipped = ", ".join(f"{k} {stats[k]}" for k in ("bad_caption", "bad_image", "no_edit", "short"))
    typer.echo(f"{stats['written']} lines from {stats['kept_rows']}/{stats['rows']} rows ({skipped}) -> {out}")


@app.command("label")
def label_command(
    data: str = typer.Option(..., "--data", help="Pick-a-Pic-schema table (parquet/arrow/save_to_disk/JSONL)"),
    reward: str = typer.Option("pickscore", "--reward", help='registry name, or YAML: "{name: pickscore, model: ..}"'),
    out: Path | None = typer.Option(None, "--out", help="output parquet (default: <data>_<reward>.parquet)"),
    batch_size: int = typer.Option(32, "--batch-size", help="pairs per reward call"),
    chunk_pairs: int = typer.Option(1024, "--chunk-pairs", help="pairs per resumable part file"),
    split: str | None = typer.Option(None, "--split", help="split of a multi-split source"),
    device: str | None = typer.Option(None, "--device", help="cuda / cpu; default: cuda if available"),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32 | fp16 | bf16"),
) -> None:
    """Score both images of every pair with a reward; the reward picks the winner (human label only removes ties)."""
    import yaml

    from diffalign.labeling import label_pairs

    spec = yaml.safe_load(reward) if reward.lstrip().startswith("{") else reward
    stats = label_pairs(
        data, out, spec, batch_size=batch_size, chunk_pairs=chunk_pairs, split=split, device=device, dtype=dtype
    )
    counts = ", ".join(f"{k} {v}" for k, v in stats.items() if k != "out")
    typer.echo(f"{counts}\nlabelled pairs: {stats['out']}")


@app.command("invert")
def invert_command(
    model: str = typer.Option(..., "--model", help="diffusers pipeline folder (SD1.x/2.x, SDXL, SD3)"),
    image: Path = typer.Option(..., "--image", help="image file to invert"),
    prompt: str = typer.Option(..., "--prompt", help="caption the inversion is conditioned on"),
    out: Path = typer.Option(Path("inversion"), "--out", help="folder for inverted.safetensors, PNGs, inversion.json"),
    steps: int = typer.Option(50, "--steps", help="sampler / inversion steps"),
    renoise_steps: int | None = typer.Option(
        None, "--renoise-steps", help="ReNoise iterations K (official: 1; DDIM: 0 with --lambda-kl 0 --lambda-ac 0)"
    ),
    average_range: str | None = typer.Option(
        None, "--average-range", help="START,END: average iterations START <= i < END, or 'none' (official: 8,10)"
    ),
    early_timestep: float | None = typer.Option(
        None, "--early-timestep", help="steps with t below this use the --early-* settings (official: 250; 0 = off)"
    ),
    early_renoise_steps: int | None = typer.Option(
        None, "--early-renoise-steps", help="at most this many iterations at early steps (official: 5)"
    ),
    early_average_range: str | None = typer.Option(
        None, "--early-average-range", help="averaging window at early steps, START,END or 'none' (official: 0,5)"
    ),
    average_from: int | None = typer.Option(
        None, "--average-from", help="shorthand: average iterations >= this at every step (-1: no averaging)"
    ),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="CFG for inversion and reconstruction"),
    lambda_kl: float | None = typer.Option(
        None, "--lambda-kl", help="patch-KL noise regularisation (official: 0.065)"
    ),
    lambda_ac: float | None = typer.Option(None, "--lambda-ac", help="autocorrelation regularisation (official: 20)"),
    anchor: str | None = typer.Option(
        None, "--anchor", help="patch-KL anchor: clean (official SD) or noised (official SDXL)"
    ),
    eta: float = typer.Option(0.0, "--eta", help="DDIM η of the reconstruction; > 0 turns on noise correction"),
    resolution: int | None = typer.Option(None, "--resolution", help="side in pixels (default: the model's)"),
    device: str | None = typer.Option(None, "--device", help="cuda / cpu; default: cuda if available"),
    seed: int = typer.Option(0, "--seed", help="seed of the regularisation anchor noise"),
) -> None:
    """Invert an image with DDIM/ReNoise, reconstruct it, and report the reconstruction error. Unset ReNoise options
    take ReNoise's official values for the model's family (`diffalign.inversion.paper_renoise`)."""
    from diffalign.inversion import invert_image

    if average_from is not None and (average_range is not None or early_average_range is not None):
        raise typer.BadParameter("`--average-from` replaces both windows; drop it or the `--*average-range` options")
    values = dict(num_renoise_steps=renoise_steps, early_timestep=early_timestep, lambda_kl=lambda_kl)
    values.update(early_max_renoise_steps=early_renoise_steps, lambda_ac=lambda_ac, anchor=anchor)
    renoise = {k: v for k, v in values.items() if v is not None}
    for key, text in (("average_range", average_range), ("early_average_range", early_average_range)):
        if text is not None:
            renoise[key] = _window(text, "--" + key.replace("_", "-"))
    if average_from is not None:  # every step alike: K + 1 estimates, averaged from `average_from` on
        renoise.update(average_range=None, early_average_range=None)
        if average_from >= 0:
            k = renoise_steps if renoise_steps is not None else average_from
            renoise["average_from"] = min(average_from, k)
    if eta > 0:
        renoise.update(noise_correction=True, eta=eta)
    try:
        report = invert_image(
            model, image, prompt, out, num_steps=steps, renoise=renoise, guidance_scale=guidance_scale,
            resolution=resolution, device=device, seed=seed,
        )  # fmt: skip
    except FloatingPointError as err:  # the regularisation diverged: say which knob to turn
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"latent MSE {report['latent_mse']:.4g} · PSNR {report['psnr']:.2f} dB (VAE alone {report['psnr_vae']:.2f} dB)"
        f" · inverted latent std {report['latent_std']:.3f}\nlatents: {report['latents_path']}\n"
        f"reconstruction: {report['reconstruction_path']}"
    )


def _window(text: str, flag: str) -> tuple[int, int] | None:
    """`START,END` → `(START, END)`; `none` → `None` (no averaging)."""
    if text.strip().lower() == "none":
        return None
    try:
        start, end = (int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"`{flag}` must be START,END (e.g. 8,10) or none, got {text!r}") from None
    return start, end


@app.command("generate")
def generate_command(
    model: str = typer.Option(..., "--model", help="diffusers pipeline folder, hub id, or `toy`"),
    prompt: list[str] = typer.Option(None, "--prompt", help="a prompt (repeat for several)"),
    prompts: str | None = typer.Option(None, "--prompts", help="prompt file/folder, toy:heldout, pickapic:PATH"),
    out: Path = typer.Option(Path("generated"), "--out", "-o", help="images go to OUT/seed<k>/<index>.png"),
    lora: str | None = typer.Option(None, "--lora", help="LoRA of the positive model (diffusers format)"),
    negative_adapter: str | None = typer.Option(
        None, "--negative-adapter", help="NPO / Self-NPO offset δ for the CFG unconditional branch (final/ or file)"
    ),
    alpha: float = typer.Option(1.0, "--alpha", help="weight of η (the model's offset over the base) in θ_neg"),
    beta: float = typer.Option(1.0, "--beta", help="weight of δ in θ_neg = θ_base + α·η + β·δ"),
    base: str | None = typer.Option(None, "--base", help="base model; only for α ≠ 1 with a fully fine-tuned model"),
    seeds: str = typer.Option("0", "--seeds", help="comma list of seeds, one image per prompt per seed"),
    steps: int | None = typer.Option(None, "--steps", help="sampler steps; default: the model's own (toy: 20) or 25"),
    guidance_scale: float | None = typer.Option(
        None, "--guidance-scale", help="CFG scale (≤ 1: off, δ unused); default: the model's own (toy: 3) or 7.5"
    ),
    scheduler: str | None = typer.Option(None, "--scheduler", help="ddim, euler, dpm++, ...; default: the model's"),
    resolution: int | None = typer.Option(None, "--resolution", help="image side in pixels; default: the model's"),
    batch_size: int = typer.Option(8, "--batch-size", help="prompts per pipeline call"),
    device: str | None = typer.Option(None, "--device", help="cuda / cpu; default: cuda if available"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16 | bf16"),
) -> None:
    """Generate images with paired seeds from a stock pipeline, optionally with a negative adapter in CFG."""
    from diffalign.config import ConfigError
    from diffalign.evaluation.generate import generate_images, load_pipeline, sampling_defaults
    from diffalign.evaluation.prompts import PromptItem, PromptSet, load_prompts
    from diffalign.rewards.base import resolve_device, resolve_dtype

    if bool(prompt) == bool(prompts):
        raise ConfigError("give either `--prompt` (one or more) or `--prompts` (a prompt set), not both or neither")
    items = tuple(PromptItem(text, "", i) for i, text in enumerate(prompt or []))
    prompt_set = load_prompts(prompts) if prompts else PromptSet("cli", items)
    seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    defaults = sampling_defaults(model)
    steps = steps if steps is not None else defaults["num_inference_steps"]
    guidance_scale = guidance_scale if guidance_scale is not None else defaults["guidance_scale"]
    pipe = load_pipeline(
        model, lora, scheduler, resolve_device(device), resolve_dtype(dtype), negative_adapter, alpha, beta, base
    )
    paths = generate_images(
        pipe, prompt_set, seed_list, out, steps, guidance_scale, resolution, batch_size, desc="generate"
    )
    typer.echo(f"{len(paths)} images: {out}")


@app.command("export")
def export_command(
    run: Path = typer.Argument(
        ..., help="run folder (uses its final/), a final/ folder, or a checkpoint-<step>/ folder"
    ),
    format: str = typer.Option(
        "kohya", "--format", "-f", help="kohya (ComfyUI/A1111/Forge LoRA), diffusers, single-file, lora"
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="file (kohya, single-file) or folder (diffusers, lora)"),
    dtype: str | None = typer.Option(None, "--dtype", help="fp16 | bf16 | fp32 (default: fp16 files, fp32 folders)"),
    config: Path | None = typer.Option(None, "--config", help="training YAML, for a checkpoint without final/"),
    method: str | None = typer.Option(None, "--method", help="method name when the run cannot tell (dpo vs npo)"),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", help="Hub repo id to upload the export to"),
    private: bool = typer.Option(False, "--private", help="create the Hub repo private"),
) -> None:
    """Export a run for other runtimes: kohya LoRA, diffusers folder, single-file checkpoint; card; Hub upload."""
    from diffalign.config import ConfigError
    from diffalign.export import export_run

    if out is None and push_to_hub is None:
        raise ConfigError("give `--out` (where the export goes) and/or `--push-to-hub REPO_ID`")
    if push_to_hub and format in ("kohya", "single-file"):
        raise ConfigError(f"`--push-to-hub` uploads a folder: use --format lora or diffusers, got {format!r}")
    target = out or Path(run) / "hub"
    path = export_run(run, format, target, dtype=dtype, config=config, method=method, repo_id=push_to_hub)
    typer.echo(f"{format}: {path}")
    if push_to_hub:
        from diffalign.export.hub import push_to_hub as push

        typer.echo(f"uploaded: {push(path, push_to_hub, private=private)}")


from diffalign.collect.cli import collect_app  # noqa: E402 (typer only; the web stack loads when a command runs)

app.add_typer(collect_app, name="collect")


@app.command("env")
def env_command(as_json: bool = typer.Option(False, "--json", help="print the report as JSON")) -> None:
    """Versions, devices, attention kernels and mixed-precision support: paste it into a bug report."""
    import json

    from diffalign.env_report import environment, format_environment

    report = environment()
    typer.echo(json.dumps(report, indent=2) if as_json else format_environment(report))


@app.command()
def demo(
    method: str = typer.Option("dpo", "--method", "-m", help="dpo, kto, npo, self-npo, smpo, tdpo, tkto or sail."),
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Output folder: data/, <method>/, report/."),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long smoke run (few prompts, 2 steps)."),
) -> None:
    """Align the shipped toy model on the toy world and measure it on held-out prompts (offline, CPU, minutes)."""
    from diffalign.toyworld.demo import format_summary, run_demo

    results = run_demo(method, out, quick=quick)
    typer.echo(format_summary(results, out))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown as one line, no traceback."""
    from diffalign.backbones import ModelNotFoundError
    from diffalign.config import ConfigError
    from diffalign.data import DataError
    from diffalign.export.hub import HubError
    from diffalign.optional import MissingDependencyError
    from diffalign.trainers.distributed import LaunchError

    return (
        ConfigError, ModelNotFoundError, DataError, FileNotFoundError, LaunchError, HubError, MissingDependencyError,
    )  # fmt: skip


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in (
        "httpx",
        "urllib3",
        "huggingface_hub",
        "filelock",
        "accelerate.checkpointing",
        "accelerate.accelerator",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torchao (the `quant` extra) is imported by diffusers and transformers at start-up: its enum registrations warn
    # through torch's pytree logger, torchao < 0.18 warns that its C++ kernels do not match this torch (the weight-only
    # formats used here run without them), and diffusers 0.42 warns that it cannot find torchao 0.17+'s moved tensor
    # classes (only relevant to loading torchao-serialised checkpoints, which diffalign never does)
    for import_noise in (
        "torch.utils._pytree",
        "torchao",
        "transformers.quantizers.quantizer_torchao",
        "diffusers.quantizers.torchao.torchao_quantizer",
    ):
        logging.getLogger(import_noise).setLevel(logging.ERROR)
    try:
        app()
    except Exception as err:  # not SystemExit: `--help` must not import the library to classify it
        preempted = sys.modules.get("diffalign.trainers.preemption")
        if preempted is not None and isinstance(err, preempted.Preempted):
            typer.secho(str(err), fg="yellow", err=True)
            sys.exit(128 + err.signum)
        errors = sys.modules.get("diffalign.trainers.errors")
        if errors is not None and isinstance(err, errors.RunFailedError):  # a failed run, not a user error
            typer.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)
        if not isinstance(err, _user_errors()):
            raise
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    """Trainers leave the process group up (a process may train several runs); tear it down once at exit."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
