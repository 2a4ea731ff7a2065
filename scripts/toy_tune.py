"""Tune a toy-world preset without touching the held-out split.

Trains `METHOD` with the demo's data builder and the `toy_<method>` preset plus `key=value` overrides, then compares
it with the base on a VALIDATION set: every third `train` caption (54 captions, combinations the base and the demo
data were trained on) × seeds 2000–2003 (never used for training data or the demo evaluation). The held-out
captions × seeds 1000–1007 stay for the one final `diffalign demo` measurement. One JSON line per run is appended
to `OUT/results.jsonl`.

    python scripts/toy_tune.py tdpo --name tdpo_b5000 beta=5000
    python scripts/toy_tune.py npo --name npo_default --betas 0.25,0.5,1      # negative adapters: sweep β at inference
    python scripts/toy_tune.py tdpo --name tdpo_cfg4 --guidance 4             # evaluate at another CFG scale

Data builders are shared between runs through `OUT/data` (each reuses its output when its settings match), so the
demo's sampling of pairs happens once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import typer
import yaml

from diffalign.evaluation.run import run_eval
from diffalign.toyworld import demo
from diffalign.toyworld.sampling import SAMPLING
from diffalign.toyworld.world import prompts

VALIDATION_SEEDS = [2000, 2001, 2002, 2003]


def validation_prompts(out: Path) -> Path:
    path = out / "validation_prompts.txt"
    path.write_text("\n".join(prompts("train")[::3]) + "\n")
    return path


def main(
    method: str = typer.Argument(..., help=f"one of {', '.join(sorted(demo.DEMO_METHODS))}"),
    overrides: list[str] = typer.Argument(None, help="preset overrides as key=value (YAML values)"),
    name: str = typer.Option(..., help="run name: OUT/runs/NAME"),
    out: Path = typer.Option(Path("runs/toy_tune"), help="where data, runs and results.jsonl go"),
    betas: str = typer.Option("", help="negative adapters only: comma-separated β of θ_neg = θ + β·δ to compare"),
    guidance: float = typer.Option(float(SAMPLING["guidance_scale"]), help="CFG scale of the evaluation"),
    threads: int = typer.Option(1, help="torch threads (several runs on 2 cores thrash with more)"),
) -> None:
    torch.set_num_threads(threads)
    layer = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides or [])}
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    if not (run_dir / "data").exists():
        (run_dir / "data").symlink_to((out / "data").resolve())
    ctx = demo.DemoContext(run_dir, overrides=layer)
    spec = demo.DEMO_METHODS[method]
    start = time.perf_counter()
    data = spec.build_data(ctx)
    data_seconds = time.perf_counter() - start
    final = demo.train_method(ctx, method, data)
    train_seconds = time.perf_counter() - start - data_seconds
    models = spec.eval_models(ctx, final)
    if betas:
        (tuned,) = [k for k in models if k != "base"]
        spec_tuned = models.pop(tuned)
        models.update({f"{tuned}_beta{b}": {**spec_tuned, "beta": float(b)} for b in betas.split(",")})
    eval_dir = out / f"validation_cfg{guidance:g}"
    for model in models:  # runs share the base images; a re-run of NAME regenerates its own
        if model != "base":
            shutil.rmtree(eval_dir / "images" / f"{name}-{model}", ignore_errors=True)
    named = {k if k == "base" else f"{name}-{k}": v for k, v in models.items()}
    prompts_file = str(validation_prompts(out))
    cfg = demo.toy_eval_config(
        named, prompts_file, VALIDATION_SEEDS, eval_dir, guidance_scale=guidance, grid_prompts=0
    )
    results = run_eval(cfg)
    row = {
        "method": method,
        "name": name,
        "overrides": layer,
        "guidance": guidance,
        "data_s": round(data_seconds, 1),
        "train_s": round(train_seconds, 1),
        "mean_toy_reward": {k: round(v["toy"]["mean"], 4) for k, v in results["models"].items()},
        "win_rate": {
            k: [round(v["toy"]["win_rate"], 3), [round(x, 3) for x in v["toy"]["ci95"]]]
            for k, v in results["win_rates"].items()
        },
    }
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    typer.echo(json.dumps(row, indent=1))


if __name__ == "__main__":
    typer.run(main)
