"""`diffalign export`: kohya LoRA files load in stock diffusers with the same images as the native file (alpha from
the real `lora_alpha`), their names follow kohya's rules, complete pipeline folders, model cards, hub errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import scale_cases
from diffalign.cli import app
from diffalign.config import ConfigError
from diffalign.export import export_run
from diffalign.export.card import push_to_hub
from diffalign.export.kohya import module_name, sgm_block_map

PROMPTS = ["a red square", "a blue circle"]


def _train(model, tmp_path, name, **kw):
    data = scale_cases.write_data(tmp_path / "data")
    values = {**dict(lora_rank=4, lora_alpha=8.0, learning_rate=0.05, max_steps=2, checkpointing_steps=2), **kw}
    scale_cases.run("dpo", model, data["dpo"], tmp_path / name, batch_size=2, ga=1, **values)
    return tmp_path / name


def _images(pipe) -> torch.Tensor:
    gen = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    out = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, height=16, width=16, generator=gen,
               output_type="pt")  # fmt: skip
    return out.images


def _pipe(model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_file_loads_in_diffusers_with_the_same_images(family, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}_path")
    run = _train(model, tmp_path, "run")
    kohya = export_run(run, "kohya", tmp_path / "lora.safetensors")

    native = _pipe(model)
    native.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    from_kohya = _pipe(model)
    from_kohya.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    a, b = _images(native), _images(from_kohya)
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - _images(_pipe(model))).abs().max().item() > 1e-3  # the LoRA changes the images

    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert alphas == {8.0} and meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any("input_blocks" in k for k in keys) == (family == "sdxl")


def test_kohya_alpha_is_what_makes_the_images_match(tiny_sd_path, tmp_path):
    """Written with alpha = rank (the common bug) the same file gives other images."""
    from safetensors.torch import load_file, save_file

    run = _train(tiny_sd_path, tmp_path, "run")
    kohya = export_run(run, "kohya", tmp_path / "lora.safetensors")
    wrong = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in load_file(str(kohya)).items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    right_pipe, wrong_pipe = _pipe(tiny_sd_path), _pipe(tiny_sd_path)
    right_pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    wrong_pipe.load_lora_weights(str(tmp_path), weight_name="wrong.safetensors")
    assert (_images(right_pipe) - _images(wrong_pipe)).abs().max().item() > 1e-3


SDXL_UNET = {"layers_per_block": 2, "block_out_channels": [320, 640, 1280]}
SD15_UNET = {"layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280]}


def test_kohya_names_follow_the_kohya_rules_on_the_real_layouts():
    sgm = sgm_block_map(SDXL_UNET)
    assert module_name("sdxl", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", sgm) == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert module_name("sdxl", "unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0", sgm) == (
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
    )
    assert module_name("sdxl", "unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_k", sgm) == (
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_k"
    )
    assert module_name("sdxl", "unet", "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v", sgm) == (
        "lora_unet_output_blocks_3_1_transformer_blocks_1_attn2_to_v"
    )
    assert module_name("sdxl", "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", sgm) == (
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    )
    assert module_name("sd", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert module_name("sd", "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert module_name("sdxl", "text_encoder_2", "text_model.encoder.layers.31.mlp.fc1") == (
        "lora_te2_text_model_encoder_layers_31_mlp_fc1"
    )
    # SD1.5: 4 levels x 2 layers; SDXL's level 0 has no attention but keeps its input-block slots
    assert sgm_block_map(SD15_UNET)["up_blocks.3.attentions.2"] == "output_blocks.11.1"
    with pytest.raises(ValueError, match="outside the UNet's attention blocks"):
        module_name("sdxl", "unet", "down_blocks.1.resnets.0.conv1", sgm)


def test_checkpoint_exports_like_final_and_diffusers_folder_matches(tiny_sd_path, tmp_path):
    run = _train(tiny_sd_path, tmp_path, "run")
    from_final = export_run(run, "kohya", tmp_path / "final.safetensors")
    from_ckpt = export_run(run / "checkpoint-2", "kohya", tmp_path / "ckpt.safetensors")
    with safe_open(str(from_final), "pt") as a, safe_open(str(from_ckpt), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    folder = export_run(run, "diffusers", tmp_path / "pipeline")
    native = _pipe(tiny_sd_path)
    native.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    assert (_images(_pipe(folder)) - _images(native)).abs().max().item() <= 1e-4

    from huggingface_hub import ModelCard

    card = ModelCard.load(str(folder / "README.md"))
    assert card.data.base_model == str(tiny_sd_path) and "diffusion-dpo" in card.data.tags
    text = card.text
    assert "| beta | 50.0 |" in text and "| max_steps | 2 |" in text and "load_lora" not in text
    assert "DiffusionPipeline.from_pretrained" in text and "<lora:" in text


def test_full_finetune_exports_as_a_pipeline_not_as_kohya(tiny_sd_path, tmp_path):
    run = _train(tiny_sd_path, tmp_path, "full", lora_rank=0, lora_alpha=None, learning_rate=1e-3)
    with pytest.raises(ConfigError, match="full fine-tune, not a LoRA"):
        export_run(run, "kohya", tmp_path / "x.safetensors")
    folder = export_run(run, "diffusers", tmp_path / "pipeline")
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(run / "final" / "unet")
    exported = _pipe(folder).unet
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), exported.parameters()))


def test_cli_export_and_offline_hub_error(tiny_sd_path, tmp_path, monkeypatch):
    run = _train(tiny_sd_path, tmp_path, "run")
    result = CliRunner().invoke(
        app, ["export", str(run), "--format", "kohya", "--out", str(tmp_path / "l.safetensors")]
    )
    assert result.exit_code == 0 and (tmp_path / "l.safetensors").is_file()
    bad = CliRunner().invoke(app, ["export", str(run), "--format", "ckpt", "--out", str(tmp_path / "x")])
    assert "`--format` must be one of kohya, diffusers" in str(bad.exception)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot push to the Hub repo 'me/model': HF_HUB_OFFLINE is set"):
        push_to_hub(tmp_path, "me/model")
    assert json.loads((run / "final" / "run.json").read_text())["method"] == "dpo"


def test_train_push_to_hub_fails_before_training_when_offline(tiny_sd_path, tmp_path):
    data = scale_cases.write_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="needs the Hub, but HF_HUB_OFFLINE is set"):
        scale_cases.run("dpo", tiny_sd_path, data["dpo"], tmp_path / "out", 2, 1, push_to_hub=True,
                        hub_model_id="me/x")  # fmt: skip
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_publish_run_writes_a_card_and_uploads_the_complete_folder(tiny_sd_path, tmp_path, monkeypatch):
    import huggingface_hub

    import diffalign.backbones.base as backbone_base
    from diffalign.export import publish_run

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(backbone_base, "hub_offline", lambda: False)
    run = _train(tiny_sd_path, tmp_path, "run")
    url = publish_run(run / "final", "me/dpo-tiny")
    assert url == "https://huggingface.co/me/dpo-tiny" and calls["create"] == ("me/dpo-tiny", True)
    assert {"README.md", "pytorch_lora_weights.safetensors", "config.yaml", "run.json"} <= set(calls["files"])
    card = (run / "final" / "README.md").read_text()
    assert 'pipe.load_lora_weights("me/dpo-tiny")' in card and f'from_pretrained("{tiny_sd_path}"' in card
