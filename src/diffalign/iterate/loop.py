"""The generate → label → pair → mix → train loop (SAIL with `labeler: implicit`, online DPO with a reward).

Layout of OUT (`output_dir`), one folder per round, each marked finished by `done.json`, written last:

    round-0/train/          DPO on the seed pairs from the base (a normal training run: checkpoints, final/)
    round-0/final/          the round's weights as one LoRA over the BASE (or full weights)
    round-k/model/          εᵏ, the round's starting model: round k−1's start with its trained weights fused in
    round-k/samples/        N candidates per prompt, `seed<s>/<index>.png`, generation.json (settings)
    round-k/prompts.json    the round's prompts (disjoint from every other round's) and seeds
    round-k/labels.jsonl    one line per candidate: prompt, seed, image, label reward, held-out reward
    round-k/pairs.parquet   best vs worst per prompt (Pick-a-Pic schema + score_0/score_1 = the label rewards)
    round-k/train_pairs.parquet, mixup.json   self pairs + seed pairs at the configured ratio
    round-k/train/, final/, done.json         as round 0
    sail_rounds.jsonl       one line of health per finished round;  final/ = the last round's final/

A killed run continues where it stopped: finished rounds are skipped, images on disk are reused, a finished label
file is reused, and the round's training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.config import ConfigError, build_config

from .config import SAILConfig
from .labelers import ImplicitRewardLabeler, RewardLabeler, concordance, diversity, margin_summary, pixels_of
from .weights import LORA_FILE, concat_loras, fuse_into_pipeline

logger = logging.getLogger(__name__)
RESUMABLE_CHANGES = {"output_dir", "rounds", "stop_on_collapse", "collapse_diversity", "collapse_confidence"}


def run_sail(cfg: SAILConfig) -> Path:
    """Run (or continue) every round; returns `OUT/final`."""
    from diffalign.evaluation.generate import resolve_model_path

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`train sail` runs in one process (it samples and labels between rounds); launch it plainly")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(out, cfg)
    plan = _prompt_plan(out, cfg)
    base = resolve_model_path(cfg.model)
    start, last_final = base, None
    for k in range(cfg.rounds + 1):
        rdir = out / f"round-{k}"
        if k > 0:
            start = _start_model(out, k, start, base)
        if (rdir / "done.json").is_file():
            last_final = rdir / "final"
            logger.info("round %d: finished earlier, skipped", k)
            continue
        began = time.perf_counter()
        health: dict = {"round": k}
        data = cfg.data
        if k > 0:
            anchor = base if k == 1 else str(out / "round-1" / "model")
            health.update(self_label_round(cfg, k, rdir, start, anchor, plan[k - 1]))
            _collapse_check(out, cfg, health)
            if health["collapse_warning"] and cfg.stop_on_collapse:
                (rdir / "stopped.json").write_text(json.dumps(health, indent=2))
                logger.warning("round %d: stopped on collapse (%s)", k, "; ".join(health["collapse_warning"]))
                break
            data = str(mix_pairs(cfg, k, rdir, health))
        trained = train_round(cfg, k, start, data, rdir / "train")
        health["train"] = _last_metrics(rdir / "train" / "metrics.jsonl")
        last_final = _round_final(out, k, trained)
        health["time_s"] = round(time.perf_counter() - began, 1)
        _atomic_write(rdir / "done.json", json.dumps({"final": str(last_final), "health": health}, indent=2))
        _write_rounds_log(out)
        _track(out, cfg, health)
    if last_final is None:
        raise ConfigError(f"no round of {str(out)!r} finished")
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(last_final, final)
    return final


# ---- one round --------------------------------------------------------------------------------------------------
def self_label_round(cfg: SAILConfig, k: int, rdir: Path, start: str, anchor: str, prompts: list[str]) -> dict:
    """Sample `candidates` images per prompt from the round's start model, label them, keep best vs worst per
    prompt → `pairs.parquet`; returns the round's health (label margins, diversity, agreement with the held-out
    reward)."""
    from diffalign.evaluation.generate import check_settings, generate_images, load_pipeline, sampling_defaults
    from diffalign.evaluation.prompts import PromptItem, PromptSet

    seeds = [(k - 1) * cfg.candidates + j for j in range(cfg.candidates)]
    prompt_set = PromptSet(f"sail-round-{k}", tuple(PromptItem(t, "", i) for i, t in enumerate(prompts)))
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "prompts.json").write_text(json.dumps({"prompts": prompts, "seeds": seeds}, indent=2))
    defaults = sampling_defaults(start)
    steps = cfg.num_inference_steps or defaults["num_inference_steps"]
    scale = cfg.guidance_scale if cfg.guidance_scale is not None else defaults["guidance_scale"]
    settings = {
        "model": f"round-{k}/model",
        "num_inference_steps": steps,
        "guidance_scale": scale,
        "scheduler": cfg.scheduler,
    }
    settings["resolution"] = cfg.sample_resolution
    check_settings(rdir / "samples", settings)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(start, scheduler=cfg.scheduler, device=device)
    paths = generate_images(pipe, prompt_set, seeds, rdir / "samples", steps, scale, cfg.sample_resolution,
                            cfg.sample_batch_size, desc=f"SAIL round {k} candidates")  # fmt: skip
    del pipe
    labels = _labels(cfg, k, rdir, start, anchor, prompts, seeds, paths, device)
    return _pairs(cfg, k, rdir, labels)


def _labels(cfg, k, rdir, start, anchor, prompts, seeds, paths, device) -> list[dict]:
    file = rdir / "labels.jsonl"
    if file.is_file():
        return [json.loads(line) for line in file.read_text().splitlines()]
    if cfg.labeler == "implicit":
        beta = {**cfg.train, **cfg.round_train.get(k, {})}.get("beta", 5000.0)
        labeler = ImplicitRewardLabeler(start, anchor, beta, cfg.noise_draws, cfg.label_batch_size, device)
    else:
        labeler = RewardLabeler(cfg.labeler, device)
    heldout = RewardLabeler(cfg.heldout_reward, device) if cfg.heldout_reward is not None else None
    rows = []
    for i, text in enumerate(prompts):
        images = [Image.open(paths[(i, s)]).convert("RGB") for s in seeds]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k * 100_003 + i)
        reward = labeler(images, text, generator).tolist()
        held = heldout(images, text).tolist() if heldout is not None else [None] * len(seeds)
        for s, r, h in zip(seeds, reward, held):
            image = str(paths[(i, s)].relative_to(rdir))
            rows.append({"prompt_index": i, "caption": text, "seed": s, "image": image, "reward": r, "heldout": h})
    _atomic_write(file, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _pairs(cfg: SAILConfig, k: int, rdir: Path, labels: list[dict]) -> dict:
    """Best vs worst per prompt (the winner's column alternates) and the round's label health."""
    import pandas as pd

    by_prompt: dict[int, list[dict]] = {}
    for row in labels:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    pairs, margins, divs, agree, concord, held_all = [], [], [], [], [], []
    for group in by_prompt.values():
        reward = torch.tensor([r["reward"] for r in group])
        pixels = pixels_of([Image.open(rdir / r["image"]) for r in group])
        divs.append(diversity(pixels))
        held = [r["heldout"] for r in group]
        if held[0] is not None:
            held_all += held
            c = concordance(reward, torch.tensor(held))
            concord += [] if c is None else [c]
        best, worst = group[int(reward.argmax())], group[int(reward.argmin())]
        if best["reward"] - worst["reward"] <= cfg.min_margin:
            continue
        margins.append(best["reward"] - worst["reward"])
        if best["heldout"] is not None:
            agree.append(float(best["heldout"] > worst["heldout"]) + 0.5 * float(best["heldout"] == worst["heldout"]))
        w_first = len(pairs) % 2 == 0
        first, second = (best, worst) if w_first else (worst, best)
        pairs.append({
            "caption": best["caption"],
            "jpg_0": (rdir / first["image"]).read_bytes(), "jpg_1": (rdir / second["image"]).read_bytes(),
            "label_0": 1.0 if w_first else 0.0, "label_1": 0.0 if w_first else 1.0,
            "score_0": first["reward"], "score_1": second["reward"],
            "seed_0": first["seed"], "seed_1": second["seed"], "source": "self", "round": k,
        })  # fmt: skip
    if not pairs:
        raise ConfigError(f"round {k}: every prompt's candidates tied (margin <= `min_margin` {cfg.min_margin})")
    pd.DataFrame(pairs).to_parquet(rdir / "pairs.parquet")
    health = {"labeler": cfg.labeler if isinstance(cfg.labeler, str) else cfg.labeler.get("name"),
              "prompts": len(by_prompt), "self_pairs": len(pairs), "ties_dropped": len(by_prompt) - len(pairs),
              "diversity": float(np.mean(divs)), **margin_summary(margins)}  # fmt: skip
    if agree:
        health.update(agreement=float(np.mean(agree)), heldout_mean=float(np.mean(held_all)))
        health["concordance"] = float(np.mean(concord)) if concord else None
    return health


def mix_pairs(cfg: SAILConfig, k: int, rdir: Path, health: dict) -> Path:
    """`train_pairs.parquet`: the round's self pairs + round(n_self·(1−α)/α) seed pairs (α = `mixup_self`), drawn
    without replacement, cycling through fresh permutations when the seed set is smaller than that."""
    import pandas as pd

    from diffalign.data.images import image_bytes
    from diffalign.data.pairs import pair_index
    from diffalign.data.tables import load_table, read_columns, source_root

    out = rdir / "train_pairs.parquet"
    own = pd.read_parquet(rdir / "pairs.parquet")
    n_seed = round(len(own) * (1 - cfg.mixup_self) / cfg.mixup_self)
    table = load_table(cfg.data)
    rows, _ = pair_index(table, "caption", {"bad_label": 0, "ties_dropped": 0, "bad_caption": 0})
    if n_seed and not len(rows):
        raise ConfigError(f"`data` {cfg.data!r} holds no usable seed pair (all ties or unlabelled)")
    rng = np.random.default_rng(cfg.seed * 7919 + k)
    repeats = math.ceil(n_seed / len(rows)) if n_seed else 0
    picks = np.concatenate([rng.permutation(len(rows)) for _ in range(repeats)] or [np.zeros(0, int)])[:n_seed]
    cells = read_columns(table.select(rows[picks].tolist()), ["caption", "jpg_0", "jpg_1", "label_0", "label_1"])
    root = source_root(cfg.data)
    seed = pd.DataFrame({
        "caption": cells["caption"], "label_0": [float(x) for x in cells["label_0"]],
        "label_1": [float(x) for x in cells["label_1"]], "jpg_0": [image_bytes(c, root) for c in cells["jpg_0"]],
        "jpg_1": [image_bytes(c, root) for c in cells["jpg_1"]],
        "source": "seed", "round": 0,
    })  # fmt: skip
    columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "source", "round"]
    mixed = pd.concat([own[columns], seed[columns]], ignore_index=True)
    mixed.to_parquet(out)
    facts = {"self": len(own), "seed": n_seed, "seed_available": len(rows), "seed_passes": repeats}
    (rdir / "mixup.json").write_text(json.dumps(facts, indent=2))
    health["mixup"] = facts
    return out


def train_round(cfg: SAILConfig, k: int, start: str, data: str, out: Path) -> Path:
    """The round's DPO (or KTO) run from `start` — a normal training run, so it resumes from its checkpoints; a
    finished one is reused."""
    from diffalign.trainers import get_trainer

    final = out / "final"
    if (final / "run.json").is_file():
        logger.info("round %d: reusing finished training %s", k, final)
        return final
    cls = get_trainer(cfg.method)
    loop = {"model": str(start), "data": str(data), "output_dir": str(out), "resume": "latest"}
    config = build_config(cls.config_class, cfg.train, cfg.round_train.get(k, {}), loop, source=f"SAIL round {k}")
    return cls(config).train()


# ---- between rounds ---------------------------------------------------------------------------------------------
def _start_model(out: Path, k: int, previous: str, base: str) -> str:
    """εᵏ = ε^{k−1} with round k−1's weights fused in (a pipeline folder; built once)."""
    from diffalign.backbones import BACKBONES, detect_family

    folder = out / f"round-{k}" / "model"
    if not (folder / "model_index.json").is_file():
        trained = out / f"round-{k - 1}" / "train" / "final"
        subfolder = BACKBONES[detect_family(base)].denoiser_subfolder
        fuse_into_pipeline(previous, trained, folder, subfolder)
        logger.info("round %d: starting model %s (round %d's weights fused in)", k, folder, k - 1)
    return str(folder)


def _round_final(out: Path, k: int, trained: Path) -> Path:
    """`round-k/final`: LoRA runs → one LoRA over the base summing rounds 0..k (ranks stacked); full fine-tunes →
    the trained weights themselves (already absolute)."""
    final = out / f"round-{k}" / "final"
    shutil.rmtree(final, ignore_errors=True)
    if (trained / LORA_FILE).is_file():
        concat_loras([out / f"round-{j}" / "train" / "final" for j in range(k + 1)], final)
    else:
        shutil.copytree(trained, final)
    (final / "sail.json").write_text(json.dumps({"round": k, "rounds_summed": list(range(k + 1))}))
    return final


def _collapse_check(out: Path, cfg: SAILConfig, health: dict) -> None:
    warnings = []
    first = health if health["round"] == 1 else json.loads((out / "round-1" / "done.json").read_text())["health"]
    if first["diversity"] > 0 and health["diversity"] < cfg.collapse_diversity * first["diversity"]:
        warnings.append(f"seed diversity {health['diversity']:.4f} < {cfg.collapse_diversity} × round 1's")
    if first["diversity"] == 0 and health["diversity"] == 0:
        warnings.append("every seed gave the same image")
    conf = health.get("confidence")
    if cfg.collapse_confidence is not None and conf is not None and conf > cfg.collapse_confidence:
        warnings.append(f"label confidence {conf:.3f} > {cfg.collapse_confidence}")
    for w in warnings:
        logger.warning("round %d: possible collapse: %s", health["round"], w)
    health["collapse_warning"] = warnings


def _last_metrics(path: Path) -> dict:
    """The round's last training step (`loss`, `implicit_acc`, …), for the rounds log."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _track(out: Path, cfg: SAILConfig, health: dict) -> None:
    """The round's numeric health as `sail/<key>` at step = round, to the tracker the rounds use (`train.report_to`):
    tensorboard → `OUT/sail/`, wandb → one run (`sail-rounds`, id kept in `OUT/wandb_id.txt`) resumed every round."""
    report_to = cfg.train.get("report_to", "none")
    if report_to == "none":
        return
    from accelerate.state import PartialState
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    PartialState()  # the trackers' main-process guard needs a state; a finished round's trainer may have reset it
    flat = {k: v for k, v in health.items() if k not in ("train", "mixup")}
    flat |= {f"train_{k}": v for k, v in health.get("train", {}).items()}
    numeric = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scalars = {f"sail/{k}": float(v) for k, v in numeric.items()}
    scalars["sail/collapse_warnings"] = float(len(health.get("collapse_warning", [])))
    if report_to == "tensorboard":
        tracker = TensorBoardTracker("sail", out)
    else:
        id_file = out / "wandb_id.txt"
        if not id_file.is_file():
            import uuid

            id_file.write_text(uuid.uuid4().hex[:12])
        project = cfg.train.get("tracker_project_name", "diffalign")
        tracker = WandBTracker(project, name="sail-rounds", id=id_file.read_text(), resume="allow", dir=str(out))
    tracker.start()
    tracker.log(scalars, step=health["round"])
    tracker.finish()


def _write_rounds_log(out: Path) -> None:
    lines = []
    for k in range(10_000):
        done = out / f"round-{k}" / "done.json"
        if not done.is_file():
            break
        lines.append(json.dumps(json.loads(done.read_text())["health"]))
    _atomic_write(out / "sail_rounds.jsonl", "".join(line + "\n" for line in lines))


def _prompt_plan(out: Path, cfg: SAILConfig) -> list[list[str]]:
    """The prompt set, de-duplicated and shuffled once (seeded), cut into disjoint per-round sets; stored in
    `plan.json` at the first start so a resumed or extended run keeps the same cut."""
    from diffalign.evaluation.prompts import load_prompts

    file = out / "plan.json"
    if file.is_file():
        plan = json.loads(file.read_text())
    else:
        texts = list(dict.fromkeys(load_prompts(cfg.prompts).texts))
        order = [texts[i] for i in np.random.default_rng(cfg.seed).permutation(len(texts))]
        per_round = cfg.prompts_per_round or (len(texts) // cfg.rounds if cfg.rounds else 0)
        plan = {"prompts_per_round": per_round, "order": order}
        _atomic_write(file, json.dumps(plan, indent=2))
    p, order = plan["prompts_per_round"], plan["order"]
    if cfg.rounds and (p < 1 or p * cfg.rounds > len(order)):
        raise ConfigError(
            f"{cfg.rounds} rounds × {p} prompts need {cfg.rounds * max(p, 1)} distinct prompts; `prompts` "
            f"{cfg.prompts!r} has {len(order)}: lower `rounds` or `prompts_per_round`"
        )
    return [order[i * p : (i + 1) * p] for i in range(cfg.rounds)]


def _check_same_run(out: Path, cfg: SAILConfig) -> None:
    """A run folder continues only the same settings (`rounds` and the collapse knobs may change; the folder may
    have moved)."""
    file = out / "sail_config.yaml"
    if file.is_file():
        import yaml

        old = yaml.safe_load(file.read_text())
        new = json.loads(json.dumps(cfg.model_dump(mode="json")))
        changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"{str(out)!r} holds a SAIL run with other settings ({', '.join(changed)}); use another "
                "`output_dir`, or the same settings to continue it"
            )
    file.write_text(cfg.to_yaml())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
