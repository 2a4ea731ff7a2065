"""SAIL / iterative DPO (`diffalign train sail`, `diffalign.iterate`) on the shipped toy model: the implicit reward
by hand, then one 2-round run (started from the CLI with 1 round, extended to 2 through the Python API) whose files,
labels, mixup, prompt split, resume and weights are checked."""

from __future__ import annotations

import io
import json
import os

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import diffalign
from diffalign.cli import app
from diffalign.config import ConfigError
from diffalign.objectives import dpo_implicit_reward

TRAIN = {"resolution": 32, "lora_rank": 4, "max_steps": 2, "batch_size": 2, "checkpointing_steps": 1,
         "learning_rate": 1e-3, "beta": 10000}  # fmt: skip
SETTINGS = {"model": "toy", "prompts": "toy:train", "prompts_per_round": 3, "candidates": 3, "noise_draws": 2,
            "heldout_reward": "toy", "num_inference_steps": 4, "train": TRAIN}  # fmt: skip


# ---- the formula ------------------------------------------------------------------------------------------------
def test_implicit_reward_by_hand():
    err = torch.tensor([[0.3, 0.5], [0.1, 0.7]])  # [K=2 draws, N=2 images]
    assert torch.equal(dpo_implicit_reward(err, err.clone(), beta=5000.0), torch.zeros(2))
    ref = torch.tensor([[0.4, 0.5], [0.2, 0.6]])
    # image 0: the policy fits it better than the reference in both draws (m − r = −0.1, −0.1) → +β/2·0.1;
    # image 1: m − r = 0 and +0.1 → −β/2·0.05 (sign: a worse fit than the reference lowers the reward)
    torch.testing.assert_close(dpo_implicit_reward(err, ref, beta=2.0), torch.tensor([0.1, -0.05]))
    torch.testing.assert_close(dpo_implicit_reward(err[0], ref[0], beta=2.0), torch.tensor([0.1, 0.0]))
    # the reward difference of two images is dpo_loss's `inside` for that pair (same draw)
    from diffalign.objectives import dpo_loss

    r = dpo_implicit_reward(err[:1], ref[:1], beta=3.0)
    _, stats = dpo_loss(err[0, :1], err[0, 1:], ref[0, :1], ref[0, 1:], beta=3.0)
    torch.testing.assert_close(r[0] - r[1], stats["reward_margin"])
    with pytest.raises(ValueError, match="same shape"):
        dpo_implicit_reward(err, ref[0], beta=1.0)


def test_implicit_labeler_is_zero_when_policy_is_the_reference():
    from diffalign.iterate.labelers import ImplicitRewardLabeler
    from diffalign.toyworld import pipeline_path, render

    toy = str(pipeline_path())
    labeler = ImplicitRewardLabeler(toy, toy, beta=5000.0, noise_draws=3, batch_size=4)
    caption = "a red circle on a blue background"
    reward = labeler([render(caption, s) for s in range(3)], caption, torch.Generator().manual_seed(0))
    assert reward.shape == (3,) and torch.equal(reward, torch.zeros(3))


# ---- one run, extended ------------------------------------------------------------------------------------------
def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Seed table of 8 rendered right-vs-wrong pairs; `train sail` with 1 round from the CLI, then the same run
    extended to 2 rounds from Python. Returns (OUT, seed table, mtimes of round 0/1 files after the first call)."""
    from diffalign.toyworld import prompts, render

    root = tmp_path_factory.mktemp("sail")
    captions = prompts("train")
    seed = root / "seed.parquet"
    rows = [{"caption": c, "jpg_0": _png(render(c, i)), "jpg_1": _png(render(captions[-1 - i], i)),
             "label_0": 1.0, "label_1": 0.0} for i, c in enumerate(captions[:8])]  # fmt: skip
    pd.DataFrame(rows).to_parquet(seed)
    out = root / "out"
    args = ["train", "sail", "--data", str(seed), "--output_dir", str(out), "--rounds", "1"]
    for key, value in SETTINGS.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sail_rounds.jsonl" in result.output
    lora = "train/final/pytorch_lora_weights.safetensors"
    watched = ["round-0/done.json", f"round-0/{lora}", "round-1/done.json", "round-1/labels.jsonl", f"round-1/{lora}",
               "round-1/samples"]  # fmt: skip
    mtimes = {p: (out / p).stat().st_mtime_ns for p in watched}
    final = diffalign.train("sail", {**SETTINGS, "data": str(seed), "output_dir": str(out), "rounds": 2})
    assert final == out / "final"
    return out, seed, mtimes


def test_every_round_writes_samples_labels_and_weights(run):
    out, _, _ = run
    for k in (0, 1, 2):
        assert (out / f"round-{k}" / "done.json").is_file()
        assert (out / f"round-{k}" / "final" / "pytorch_lora_weights.safetensors").is_file()
    for k in (1, 2):
        rdir = out / f"round-{k}"
        assert (rdir / "model" / "model_index.json").is_file() and (rdir / "model" / "sampling.json").is_file()
        assert len(list((rdir / "samples").rglob("*.png"))) == 3 * 3
        labels = [json.loads(line) for line in (rdir / "labels.jsonl").read_text().splitlines()]
        assert len(labels) == 9 and all(isinstance(r["reward"], float) and r["heldout"] is not None for r in labels)
        assert {r["seed"] for r in labels} == {3 * (k - 1), 3 * (k - 1) + 1, 3 * (k - 1) + 2}  # recorded seeds
    assert (out / "final" / "pytorch_lora_weights.safetensors").read_bytes() == (
        out / "round-2" / "final" / "pytorch_lora_weights.safetensors"
    ).read_bytes()
    log = [json.loads(line) for line in (out / "sail_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1, 2]
    for row in log[1:]:
        assert {"agreement", "concordance", "diversity", "margin_median", "confidence", "collapse_warning"} <= set(row)
        assert 0 <= row["agreement"] <= 1 and row["diversity"] > 0 and row["train"]["step"] == 2


def test_pair_winner_has_the_higher_implicit_reward(run):
    out, _, _ = run
    for k in (1, 2):
        pairs = pd.read_parquet(out / f"round-{k}" / "pairs.parquet")
        labels = [json.loads(line) for line in (out / f"round-{k}" / "labels.jsonl").read_text().splitlines()]
        for row in pairs.itertuples():
            w, lo = (row.score_0, row.score_1) if row.label_0 == 1 else (row.score_1, row.score_0)
            assert w > lo
            rewards = [r["reward"] for r in labels if r["caption"] == row.caption]
            assert (w, lo) == (max(rewards), min(rewards))  # best vs worst of the prompt's candidates


def test_mixup_ratio_is_exact_and_prompt_sets_are_disjoint(run):
    out, _, _ = run
    seen = set()
    for k in (1, 2):
        mixed = pd.read_parquet(out / f"round-{k}" / "train_pairs.parquet")
        n_self, n_seed = (mixed.source == "self").sum(), (mixed.source == "seed").sum()
        assert n_self == 3 and n_seed == 9  # 25 % / 75 %; 9 > the 8 seed pairs: a second pass over them
        assert json.loads((out / f"round-{k}" / "mixup.json").read_text())["seed_passes"] == 2
        prompts = set(json.loads((out / f"round-{k}" / "prompts.json").read_text())["prompts"])
        assert len(prompts) == 3 and not prompts & seen
        seen |= prompts


def test_resume_does_not_redo_finished_rounds(run):
    out, _, mtimes = run
    assert {p: (out / p).stat().st_mtime_ns for p in mtimes} == mtimes


def test_round_lora_over_the_base_equals_the_fused_start_of_the_next_round(run):
    """round-1/final (ranks of rounds 0 and 1 stacked) on the stock base = round-2/model (both fused in turn)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffalign.toyworld import pipeline_path

    out, _, _ = run
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    pipe.load_lora_weights(str(out / "round-1" / "final"), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    fused = UNet2DConditionModel.from_pretrained(out / "round-2" / "model" / "unet").state_dict()
    ours = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert set(fused) == set(ours)
    for key, value in fused.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-4)


def test_external_labeler_labels_with_the_reward(tmp_path, run):
    """`labeler: toy` = online DPO: the labels are the toy reward, so they agree with it on every pair."""
    _, seed, _ = run
    out = tmp_path / "toy"
    settings = {**SETTINGS, "labeler": "toy", "data": str(seed), "output_dir": str(out), "rounds": 1}
    diffalign.train("sail", {**settings, "train": {**TRAIN, "max_steps": 1}})
    labels = [json.loads(line) for line in (out / "round-1" / "labels.jsonl").read_text().splitlines()]
    assert all(r["reward"] == pytest.approx(r["heldout"]) for r in labels)
    row = json.loads((out / "sail_rounds.jsonl").read_text().splitlines()[1])
    assert row["labeler"] == "toy" and row["agreement"] == 1.0


def test_a_round_can_train_with_kto(tmp_path, run):
    """`method: kto`: the round's pairs are read unpaired (winner desirable, loser undesirable) by a KTO run."""
    _, seed, _ = run
    out = tmp_path / "kto"
    settings = {**SETTINGS, "labeler": "toy", "method": "kto", "data": str(seed), "output_dir": str(out), "rounds": 1}
    train = {k: v for k, v in TRAIN.items() if k != "beta"}
    diffalign.train("sail", {**settings, "train": {**train, "max_steps": 1}})
    for k in (0, 1):
        facts = json.loads((out / f"round-{k}" / "train" / "final" / "run.json").read_text())
        assert facts["method"] == "kto"
        metrics = json.loads((out / f"round-{k}" / "train" / "metrics.jsonl").read_text().splitlines()[0])
        assert "kl" in metrics and metrics["loss"] == pytest.approx(0.5, abs=1e-4)  # KTO at policy == reference


def test_config_refuses_paths_the_loop_sets():
    from diffalign.iterate import SAILConfig

    with pytest.raises(ValueError, match="must not set \\['model'\\]"):
        SAILConfig(model="toy", data="d", prompts="toy:train", train={"model": "x"})


def test_a_killed_round_resumes_and_other_settings_are_refused(run):
    """Last on the shared run (it rewrites round 2): killed after 1 of 2 steps, before the round was marked done."""
    import shutil

    out, seed, _ = run
    (out / "round-2" / "done.json").unlink()
    shutil.rmtree(out / "round-2" / "train" / "final")
    shutil.rmtree(out / "round-2" / "train" / "checkpoint-2")
    labels = (out / "round-2" / "labels.jsonl").stat().st_mtime_ns
    diffalign.train("sail", {**SETTINGS, "data": str(seed), "output_dir": str(out), "rounds": 2})
    assert (out / "round-2" / "labels.jsonl").stat().st_mtime_ns == labels  # labels reused, not recomputed
    metrics = (out / "round-2" / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]  # step 2 redone from checkpoint-1
    assert (out / "round-2" / "done.json").is_file() and (out / "final" / "sail.json").is_file()
    with pytest.raises(ConfigError, match="other settings \\(candidates\\)"):
        diffalign.train("sail", {**SETTINGS, "data": str(seed), "output_dir": str(out), "candidates": 4})


def test_quick_sail_demo(tmp_path):
    """`diffalign demo --method sail --quick`: rounds' LoRAs where the other demos put theirs, 5 models compared."""
    from diffalign.toyworld.demo import format_summary, run_demo

    results = run_demo("sail", tmp_path, quick=True)
    for k in (0, 1, 2):
        assert (tmp_path / "sail" / f"round-{k}" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "sail" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert set(results["models"]) == {"base", "dpo-seed", "sail-round-1", "sail", "dpo-all"}
    summary = format_summary(results, tmp_path)
    assert "sail vs base" in summary and "| 2 | 3 |" in summary  # round 2's line of the self-label table


def test_round_health_goes_to_tensorboard(tmp_path, run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, seed, _ = run
    out = tmp_path / "tb"
    train = {**TRAIN, "max_steps": 1, "checkpointing_steps": 0, "report_to": "tensorboard"}
    diffalign.train("sail", {**SETTINGS, "data": str(seed), "output_dir": str(out), "rounds": 1, "train": train})
    events = EventAccumulator(str(out / "sail")).Reload()
    logged = set(events.Tags()["scalars"])
    assert {"sail/agreement", "sail/diversity", "sail/margin_median", "sail/train_loss"} <= logged
    assert [e.step for e in events.Scalars("sail/train_loss")] == [0, 1]


def test_full_fine_tune_rounds_chain_their_weights(tmp_path, run):
    """`lora_rank: 0`: the next round starts from the trained denoiser (swapped into the pipeline folder)."""
    from safetensors.torch import load_file

    _, seed, _ = run
    out = tmp_path / "full"
    train = {**TRAIN, "lora_rank": 0, "max_steps": 1, "checkpointing_steps": 0, "learning_rate": 1e-4}
    diffalign.train("sail", {**SETTINGS, "data": str(seed), "output_dir": str(out), "rounds": 1, "train": train})
    weights = "unet/diffusion_pytorch_model.safetensors"
    trained, started = (
        load_file(out / "round-0" / "train" / "final" / weights),
        load_file(out / "round-1" / "model" / weights),
    )
    assert trained.keys() == started.keys() and all(torch.equal(trained[k], started[k]) for k in trained)
    assert (out / "final" / weights).is_file() and not (out / "final" / "pytorch_lora_weights.safetensors").exists()


def test_round_health_goes_to_one_wandb_run(tmp_path, run):
    """wandb (offline): every round's health lands in the same run id (`OUT/wandb_id.txt`), read back with wandb's
    own protobufs. In a subprocess: wandb keeps process-wide settings that would leak into later tests."""
    import subprocess
    import sys

    import wandb_records

    _, seed, _ = run
    out = tmp_path / "wb"
    train = {**TRAIN, "max_steps": 1, "checkpointing_steps": 0, "report_to": "wandb"}
    settings = {**SETTINGS, "data": str(seed), "output_dir": str(out), "rounds": 1, "train": train}
    code = "import json, sys, diffalign; diffalign.train('sail', json.loads(sys.argv[1]))"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = (out / "wandb_id.txt").read_text()
    files = sorted(out.rglob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one offline segment per round, one run id (wandb sync joins them)
    rows = {}
    for file in files:
        rows |= {int(r["_step"]): r for r in wandb_records.wait_for_rows(file, "sail/train_loss", 1)}
    assert sorted(rows) == [0, 1]  # round 0 (DPO on the seed) and round 1
    assert {"sail/agreement", "sail/diversity", "sail/margin_median"} <= rows[1].keys()  # the self-labelled round
