"""The demo's pieces end to end on the shipped toy model, cut down (`quick`): data → trainer → paired-seed eval."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.toyworld.demo import (
    DEMO_METHODS,
    DemoContext,
    format_summary,
    run_demo,
    toy_caption_list,
    toy_preference_pairs,
)


def test_toy_pairs_are_labelled_by_the_reward(tmp_path):
    ctx = DemoContext(tmp_path, quick=True)
    path = toy_preference_pairs(ctx, images_per_prompt=4, min_gap=0.05)
    table = pd.read_parquet(path)
    assert len(table) > 0
    winner_score = table.score_0.where(table.label_0 == 1, table.score_1)
    loser_score = table.score_1.where(table.label_0 == 1, table.score_0)
    assert (winner_score - loser_score >= 0.05).all()
    assert set(table.label_0) == {0.0, 1.0}  # the winner's column alternates
    meta = json.loads((tmp_path / "data" / "pairs.json").read_text())
    assert meta["stats"]["pairs"] + meta["stats"]["near_ties_dropped"] == meta["stats"]["prompts"]
    assert toy_preference_pairs(ctx, images_per_prompt=4, min_gap=0.05) == path  # reused, not regenerated


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_quick_demo_end_to_end(method, tmp_path):
    results = run_demo(method, tmp_path, quick=True)
    assert set(results["models"]) == {"base", method}
    comparison = results["win_rates"][f"{method} vs base"]["toy"]
    assert 0.0 <= comparison["ci95"][0] <= comparison["win_rate"] <= comparison["ci95"][1] <= 1.0
    assert (tmp_path / method / "final" / "pytorch_lora_weights.safetensors").is_file()
    for name in ("results.json", "grid.png", "report.md", f"{method}_metrics.png"):
        assert (tmp_path / "report" / name).is_file(), name
    summary = format_summary(results, tmp_path)
    assert f"{method} vs base" in summary and "report.md" in summary


def test_demo_cli_and_unknown_method(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "dpo vs base" in result.output
    with pytest.raises(ValueError, match="unknown demo method 'ppo'; available: .*dpo"):
        run_demo("ppo", tmp_path)
    assert {"dpo", "kto"} <= set(DEMO_METHODS)


def test_quick_self_npo_demo_trains_on_captions_only(tmp_path):
    """Self-NPO's demo input is a caption list (no images, labels or reward); its δ goes into the ∅ branch at β 0.5."""
    results = run_demo("self-npo", tmp_path, quick=True)
    captions = (tmp_path / "data" / "self_npo_captions.txt").read_text().splitlines()
    assert captions == DemoContext(tmp_path, quick=True).train_prompts()
    assert not (tmp_path / "data" / "self_npo_images").exists()
    assert set(results["models"]) == {"base", "self-npo"}
    spec = json.loads((tmp_path / "report" / "results.json").read_text())["settings"]["models"]["self-npo"]
    assert spec["beta"] == 0.5 and spec["negative_adapter"].endswith("final")


def test_caption_list_is_rewritten_when_a_quick_run_left_a_shorter_one(tmp_path):
    quick, full = DemoContext(tmp_path, quick=True), DemoContext(tmp_path)
    assert len(quick.train_prompts()) < len(full.train_prompts())
    toy_caption_list(quick)
    path = toy_caption_list(full)
    with open(path) as f:
        assert f.read().splitlines() == full.train_prompts()
