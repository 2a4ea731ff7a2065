"""GPU benchmark: diffalign's Diffusion-DPO step on SD1.5- and SDXL-shaped models with random weights (no downloads),
side by side with the diffusers research DPO script on the same model folder and data.

    bash scripts/bench_gpu.sh                      # on a GPU machine (installs carried wheels, then runs this)
    python scripts/bench_gpu.py --smoke            # the same code path on CPU with tiny models (< 1 min)

For each configuration (model, LoRA or full, attention, gradient checkpointing, bf16) it trains `warmup + timed`
optimizer steps through `diffalign.trainers.DPOTrainer` and reports the median `sec_per_step` of the timed steps
(the loop's own per-step wall time, synchronised by the loss read-back), pairs/s, and the peak CUDA memory
(`torch.cuda.max_memory_allocated`). Results are written to `OUT/bench_gpu.json` and `OUT/bench_gpu.md` after every
configuration, so a run cut short still returns what it measured. Work is ordered by importance and skipped once the
time budget would be exceeded.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a photo of red green blue cat dog on the grass sky city painting portrait of an old man".split()

SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)  # fmt: skip
VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")  # fmt: skip
TINY_UNET = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


def _tokenizer(path: Path, max_length: int):
    from diffalign.toyworld.tokenizer import write_word_tokenizer

    return write_word_tokenizer(WORDS, path, model_max_length=max_length)


def _clip(cls_name: str, dims: dict, tok_dir: Path, device: str):
    import transformers

    tokenizer = _tokenizer(tok_dir, 77)
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **dims)
    with torch.device(device):
        model = getattr(transformers, cls_name)(config)
    return model, tokenizer


def make_model(kind: str, path: Path, device: str) -> Path:
    """A random-weight pipeline folder of the real SD1.5 / SDXL layout (`tiny`: a small SD layout for --smoke)."""
    import diffusers

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    scheduler = diffusers.DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    tiny = kind == "tiny"
    with torch.device(device):
        vae = diffusers.AutoencoderKL(
            **(TINY_VAE if tiny else VAE), scaling_factor=0.13025 if kind == "sdxl" else 0.18215
        )
    if kind == "sdxl":
        te, tok = _clip("CLIPTextModel", CLIP_L, path / "_tok1", device)
        te2, tok2 = _clip("CLIPTextModelWithProjection", CLIP_G, path / "_tok2", device)
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel(**SDXL_UNET)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
            scheduler=scheduler, add_watermarker=False,
        )  # fmt: skip
    else:
        te, tok = _clip("CLIPTextModel", TINY_CLIP if tiny else CLIP_L, path / "_tok", device)
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    if not tiny:
        pipe.to(torch.bfloat16)
    pipe.save_pretrained(path)
    del pipe
    gc.collect()
    return path


def make_pairs(folder: Path, n: int, resolution: int) -> Path:
    """A Pick-a-Pic parquet folder (`train-0.parquet`) of `n` smooth random pairs (cheap JPEGs; content is irrelevant
    for timing): readable by diffalign and by `datasets.load_dataset(folder)` in the diffusers script."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((resolution, resolution), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    captions = ["a photo of a red cat on the grass", "a painting of an old man", "a blue sky over the city"]
    rows = [{"caption": captions[i % 3], "jpg_0": jpeg(), "jpg_1": jpeg(), "label_0": 1.0, "label_1": 0.0}
            for i in range(n)]  # fmt: skip
    pd.DataFrame(rows).to_parquet(folder / "train-0.parquet")
    return folder


def run_diffalign(model: Path, data: Path, out: Path, case: dict, steps: int, device: str) -> dict:
    from diffalign.config import build_config
    from diffalign.trainers import get_trainer

    cls = get_trainer("dpo")
    cfg = build_config(cls.config_class, {
        "model": str(model), "data": str(data / "train-0.parquet"), "output_dir": str(out),
        "resolution": case["resolution"], "batch_size": case["batch"], "lora_rank": case["lora_rank"],
        "mixed_precision": case["precision"], "attention": case["attention"],
        "gradient_checkpointing": case["grad_ckpt"], "max_steps": steps, "checkpointing_steps": 0,
        "learning_rate": 1e-5, "beta": 5000.0, "optimizer": "adamw", "dataloader_num_workers": 4,
        "lr_scheduler": "constant",
    })  # fmt: skip
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = cls(cfg)
    trainer.train()
    attention = trainer.attention
    del trainer
    gc.collect()
    times = [json.loads(line)["sec_per_step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"sec_per_step": statistics.median(times[case["warmup"]:]), "attention_used": attention,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}  # fmt: skip


def _diffusers_cmd(script: Path, model: Path, data: Path, out: Path, case: dict, n: int) -> list[str]:
    cmd = [
        sys.executable, str(script), "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data),
        "--dataset_split_name", "train", "--output_dir", str(out), "--resolution", str(case["resolution"]),
        "--train_batch_size", str(case["batch"]), "--rank", str(case["lora_rank"]), "--max_train_steps", str(n),
        "--mixed_precision", case["precision"], "--beta_dpo", "2500", "--learning_rate", "1e-5",
        "--dataloader_num_workers", "4", "--report_to", "tensorboard", "--seed", "0",
        "--checkpointing_steps", "100000", "--vae_encode_batch_size", str(2 * case["batch"]),
    ]  # fmt: skip
    return cmd + (["--gradient_checkpointing"] if case["grad_ckpt"] else [])


def _diffalign_cmd(model: Path, data: Path, out: Path, case: dict, n: int) -> list[str]:
    return [
        sys.executable, "-m", "diffalign", "train", "dpo", "--model", str(model), "--data",
        str(data / "train-0.parquet"), "--output_dir", str(out), "--resolution", str(case["resolution"]),
        "--batch_size", str(case["batch"]), "--lora_rank", str(case["lora_rank"]), "--max_steps", str(n),
        "--mixed_precision", case["precision"], "--beta", "5000", "--learning_rate", "1e-5", "--optimizer", "adamw",
        "--dataloader_num_workers", "4", "--checkpointing_steps", "0", "--lr_scheduler", "constant",
        "--attention", case["attention"], "--gradient_checkpointing", str(case["grad_ckpt"]).lower(),
    ]  # fmt: skip


STEP_HOOK = """import atexit, json, os, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
_stamps = []
def _after_step(optimizer, args, kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    _stamps.append(time.perf_counter())
register_optimizer_step_post_hook(_after_step)
atexit.register(lambda: open(os.environ["BENCH_STEP_LOG"], "w").write(json.dumps(_stamps)))
"""


def timed_process(cmd: list[str], out: Path, warmup: int) -> dict:
    """Run a whole training process with a `sitecustomize` that stamps the time after every optimizer step (torch's
    global optimizer post-hook, CUDA-synchronised): s/step = median gap between stamps after `warmup` steps. The same
    measurement for both tools, independent of how each logs."""
    shim = out / "shim"  # also an empty `wandb` module: the diffusers script imports it at the top (unused here)
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "wandb.py").write_text("")
    (shim / "sitecustomize.py").write_text(STEP_HOOK)
    log = out / "steps.json"
    env = {**os.environ, "PYTHONPATH": f"{shim}:{os.environ.get('PYTHONPATH', '')}", "BENCH_STEP_LOG": str(log)}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    stamps = json.loads(log.read_text())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return {"sec_per_step": statistics.median(gaps), "steps": len(stamps)} if gaps else {"error": "no steps timed"}


def run_comparison(script: Path, model: Path, data: Path, out: Path, case: dict, steps: int) -> dict:
    """Both tools as a user runs them (whole processes, same model folder, data and settings)."""
    ours = timed_process(_diffalign_cmd(model, data, out / "diffalign", case, steps), out / "diffalign", 2)
    theirs = timed_process(_diffusers_cmd(script, model, data, out / "diffusers", case, steps), out / "diffusers", 2)
    return {"diffalign_wall": ours, "diffusers": theirs}


def engine_check(engine: str, model: Path, data: Path, out: Path) -> dict:
    """Full fine-tune under a sharding engine on one GPU, as a user launches it: 2 steps with a checkpoint, a
    resume to 3, and `final/unet` loaded by stock diffusers. (FSDP2 is also tested on CPU processes in
    tests/test_fsdp.py; DeepSpeed runs only here.)"""
    config = ROOT / "src" / "diffalign" / "configs" / "accelerate" / f"{engine}.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
              "-m", "diffalign", "train", "dpo", "--model", str(model), "--data", str(data / "train-0.parquet"),
              "--output_dir", str(out), "--resolution", "512", "--batch_size", "2", "--lora_rank", "0",
              "--mixed_precision", "bf16", "--learning_rate", "1e-6", "--checkpointing_steps", "2",
              "--gradient_checkpointing", "true", "--optimizer", "adamw"]  # fmt: skip
    for steps, extra in ((2, []), (3, ["--resume", "latest"])):
        run = subprocess.run([*launch, "--max_steps", str(steps), *extra], capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            return {"engine": engine, "error": run.stderr.strip().splitlines()[-1][:200]}
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    times = [json.loads(line)["sec_per_step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"engine": engine, "ok": "2 steps, checkpoint, resume to 3, final/unet loads", "last_s": times[-1]}


def cases(smoke: bool) -> list[dict]:
    """Ordered by importance: SD1.5 LoRA first (with the diffusers comparison), then SDXL, full, checkpointing."""
    base = {"precision": "bf16", "attention": "sdpa", "grad_ckpt": False, "warmup": 2}
    if smoke:
        return [{**base, "model": "tiny", "resolution": 16, "batch": 2, "lora_rank": 4, "precision": "no",
                 "compare": True}, {**base, "model": "tiny", "resolution": 16, "batch": 2, "lora_rank": 0,
                                    "precision": "no"}]  # fmt: skip
    sd15 = {**base, "model": "sd15", "resolution": 512, "batch": 8}
    sdxl = {**base, "model": "sdxl", "resolution": 1024, "batch": 4}
    return [
        {**sd15, "lora_rank": 8, "compare": True},
        {**sd15, "lora_rank": 8, "attention": "xformers"},
        {**sd15, "lora_rank": 0},
        {**sdxl, "lora_rank": 8},
        {**sdxl, "lora_rank": 0, "grad_ckpt": True},
        {**sd15, "lora_rank": 8, "grad_ckpt": True},
        {**sdxl, "lora_rank": 8, "grad_ckpt": True},
        {**sd15, "lora_rank": 0, "grad_ckpt": True},
    ]


def write_results(out: Path, rows: list[dict], env: dict) -> None:
    (out / "bench_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [
        "| model | px | pairs/step | mode | attention | grad ckpt | precision | s/step | pairs/s | peak GiB | "
        "per-step (optimizer hook) s/step: diffalign CLI | diffusers script | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['mode']} | {r['attention']} | "
                         f"{r['grad_ckpt']} | {r['precision']} | {why} |||||||")  # fmt: skip
            continue
        ref, ours = r.get("diffusers", {}), r.get("diffalign_wall", {})
        ref_s = f"{ref['sec_per_step']:.3f}" if "sec_per_step" in ref else ref.get("error", "—")
        ours_s = f"{ours['sec_per_step']:.3f}" if "sec_per_step" in ours else ours.get("error", "—")
        both = "sec_per_step" in ref and "sec_per_step" in ours
        ratio = f"{ours['sec_per_step'] / ref['sec_per_step']:.2f}" if both else "—"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "—"
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['mode']} | {r['attention_used']} | "
                     f"{r['grad_ckpt']} | {r['precision']} | {r['sec_per_step']:.3f} | "
                     f"{r['batch'] / r['sec_per_step']:.2f} | {peak} | {ours_s} | {ref_s} | {ratio} |")  # fmt: skip
    (out / "bench_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--work", default="/tmp/diffalign_bench", help="model folders, data and runs")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, the same code path")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds; later cases are skipped past it")
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per case (the first 2 are warm-up)")
    parser.add_argument("--compare-steps", type=int, default=12, help="steps of each tool's timed process")
    parser.add_argument("--cases", default=None, help="comma list of case indices to run (default: all)")
    parser.add_argument("--diffusers-script", default=str(ROOT / ".devcarry" / "train_diffusion_dpo.py"))
    parser.add_argument("--engines", default="fsdp,deepspeed_zero3", help="configs/accelerate/NAME.yaml to check")
    args = parser.parse_args()
    start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    try:
        import xformers  # noqa: F401

        env["xformers"] = True
    except ImportError:
        env["xformers"] = False
    rows: list[dict] = []
    # a rough cost of each case in seconds, for the budget check (model build and load dominate SDXL)
    cost = {"tiny": 15, "sd15": 40, "sdxl": 90}
    selected = cases(args.smoke)
    if args.cases:
        selected = [selected[int(i)] for i in args.cases.split(",")]
    for case in selected:
        row = {**case, "mode": f"LoRA r{case['lora_rank']}" if case["lora_rank"] else "full"}
        elapsed = time.perf_counter() - start
        if elapsed + cost[case["model"]] * (2 if case.get("compare") else 1) > args.budget:
            row["skipped"] = f"skipped: time budget ({elapsed:.0f} s used)"
        elif case["attention"] == "xformers" and not env["xformers"]:
            row["skipped"] = "xformers: not available"
        else:
            try:
                model = make_model(case["model"], work / case["model"], device)
                n_pairs = case["batch"] * max(args.steps, args.compare_steps)  # no epoch restart inside a timed run
                data = make_pairs(work / f"data_{case['model']}_{n_pairs}", n_pairs, case["resolution"])
                name = "-".join(str(case[k]) for k in ("model", "lora_rank", "attention", "grad_ckpt"))
                row |= run_diffalign(model, data, work / "runs" / name, case, args.steps, device)
                script = Path(args.diffusers_script)
                if case.get("compare") and script.is_file():
                    row |= run_comparison(script, model, data, work / "ref" / name, case, args.compare_steps)
            except Exception as err:  # keep measuring the other cases; the error is reported in the table
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        write_results(out, rows, env)
    if args.engines and not args.smoke:
        checks = []
        model = make_model("sd15", work / "sd15", device)
        data = make_pairs(work / "data_engines", 8, 512)
        for engine in args.engines.split(","):
            try:
                checks.append(engine_check(engine, model, data, work / "engines" / engine))
            except Exception as err:
                checks.append({"engine": engine, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            (out / "bench_engines.json").write_text(json.dumps(checks, indent=2))
            print(checks[-1], flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
