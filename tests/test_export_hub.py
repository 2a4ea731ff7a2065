"""`push_to_hub` from a train config: refused before training when it cannot work; at the end the run is exported
with a model card and the complete folder uploaded (huggingface_hub's API, faked here: no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

import scale_cases
from diffalign.config import ConfigError


def test_train_push_to_hub_fails_before_training_when_offline(tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="needs the Hub, but HF_HUB_OFFLINE is set"):
        scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", 2, 1, push_to_hub=True,
                        hub_model_id="me/x")  # fmt: skip
    with pytest.raises(ConfigError, match="`hub_model_id` is not"):
        scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "out2", 2, 1, push_to_hub=True)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_train_push_to_hub_uploads_a_complete_folder_with_a_card(tiny_sd_path, tmp_path, monkeypatch):
    import huggingface_hub

    import diffalign.export.hub as hub
    import diffalign.trainers.base as trainer_base

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = repo_id
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(trainer_base, "_check_hub_target", lambda cfg: None)
    data = scale_cases.write_data(tmp_path / "data")
    scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "run", 2, 1, max_steps=2, learning_rate=1e-3,
                    push_to_hub=True, hub_model_id="me/dpo-tiny")  # fmt: skip
    assert calls["create"] == "me/dpo-tiny"
    assert {"README.md", "pytorch_lora_weights.safetensors"} <= set(calls["files"])
    card = (tmp_path / "run" / "hub" / "README.md").read_text()
    assert "me/dpo-tiny" in card and "dpo" in card


def test_the_method_of_a_finished_run_is_known_without_checkpoints(tiny_sd_path, tmp_path):
    """DPO and NPO configs have the same keys: `final/run.json` says which one made the weights."""
    from diffalign.export import load_run

    data = scale_cases.write_data(tmp_path / "data")
    scale_cases.run("npo", tiny_sd_path, data["npo"], tmp_path / "npo", 2, 1, checkpointing_steps=0)
    assert not list((tmp_path / "npo").glob("checkpoint-*"))
    assert load_run(tmp_path / "npo").method == "npo"
