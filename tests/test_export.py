"""`diffalign export`: kohya LoRAs (ComfyUI/A1111/Forge), diffusers folders, single-file checkpoints, cards, Hub.

Equivalence is checked with stock diffusers only: a kohya file through `load_lora_weights`, a single file through
`from_single_file`, a folder through `from_pretrained`, each against the run's native diffusers LoRA on the base model.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open

from diffalign.config import ConfigError
from diffalign.export import export_run, load_run
from diffalign.export.keymaps import unet_block_table, unet_name_to_sgm, unet_to_sgm
from diffalign.export.kohya import module_names

RANK, ALPHA = 4, 8.0  # alpha != rank: a file that stored the rank as alpha would halve the LoRA's effect
CALL = dict(num_inference_steps=2, height=16, width=16, output_type="pt", guidance_scale=5.0)


def _lora_run(base, out, method="dpo"):
    """A run folder as training writes it (final/ LoRA via the backbone's save_lora + config.yaml), with LoRA B
    weights made large enough that the adapter visibly changes images."""
    from diffalign.backbones import load_backbone

    backbone = load_backbone(base)
    backbone.add_lora(RANK, ALPHA)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.denoiser.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    final = out / "final"
    backbone.save_lora(final)
    cfg = {"model": str(base), "lora_rank": RANK, "lora_alpha": ALPHA, "beta": 500.0, "max_steps": 7, "data": "x"}
    (final / "config.yaml").write_text(yaml.safe_dump(cfg))
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "trainer_state.json").write_text(f'{{"step": 7, "method": "{method}"}}')
    return out


@pytest.fixture(scope="module")
def sd_run(tiny_sd_path, tmp_path_factory):
    return _lora_run(tiny_sd_path, tmp_path_factory.mktemp("sd_run"))


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    """Tiny SDXL whose two text encoders differ in width (768 vs 1280 in the real model), so that
    `from_single_file` can tell them apart by shape."""
    from tiny_models import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_w48"), width_2=48)


@pytest.fixture(scope="module")
def sdxl_run(sdxl_path, tmp_path_factory):
    return _lora_run(sdxl_path, tmp_path_factory.mktemp("sdxl_run"), method="npo")


def _images(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red square", generator=torch.Generator().manual_seed(seed), **CALL).images


def _native(run_dir):
    """Base + the run's native diffusers LoRA file, loaded by stock diffusers."""
    run = load_run(run_dir)
    pipe = DiffusionPipeline.from_pretrained(run.base)
    pipe.load_lora_weights(str(run.source), weight_name="pytorch_lora_weights.safetensors")
    return pipe


# ---- kohya ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_fixture", ["sd_run", "sdxl_run"])
def test_kohya_file_gives_the_native_lora_images(run_fixture, request, tmp_path):
    run_dir = request.getfixturevalue(run_fixture)
    file = export_run(run_dir, "kohya", tmp_path / "lora.safetensors", dtype="fp32")
    native = _images(_native(run_dir))
    base = _images(DiffusionPipeline.from_pretrained(load_run(run_dir).base))
    pipe = DiffusionPipeline.from_pretrained(load_run(run_dir).base)
    pipe.load_lora_weights(str(file))
    kohya = _images(pipe)
    assert (native - base).abs().max() > 1e-2  # the LoRA matters, so a wrong alpha or a skipped module shows
    assert (kohya - native).abs().max() <= 1e-4
    with safe_open(str(file), "pt") as f:
        alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
        meta = f.metadata()
    assert alphas == {ALPHA}
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == {"sd_run": "sd_v1", "sdxl_run": "sdxl_base_v1-0"}[run_fixture]
    assert meta["ss_steps"] == "7" and meta["ss_beta"] == "500"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_output_name"] == "lora"


_UNET_DEFAULTS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
}
_SDXL = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
}


def test_kohya_names_follow_the_runtime_rules_on_real_layouts():
    """Pinned names for the real SD1.5 / SDXL block layouts: SD1.5 keeps kohya's diffusers-like module paths, SDXL
    uses the SGM `input_blocks`/`middle_block`/`output_blocks` paths kohya's SDXL LoRAs carry."""
    modules = [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    ]
    sd = module_names("sd", modules, _UNET_DEFAULTS)
    assert list(sd.values()) == [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
    ]
    xl = module_names(
        "sdxl",
        [
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
            "unet.up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_v",
            "unet.up_blocks.1.attentions.0.proj_in",
            "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj",
        ],
        _SDXL,
    )
    assert list(xl.values()) == [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k",
        "lora_unet_output_blocks_2_1_transformer_blocks_3_attn2_to_v",
        "lora_unet_output_blocks_3_1_proj_in",
        "lora_te2_text_model_encoder_layers_3_self_attn_q_proj",
    ]
    # whole-checkpoint names of the SD1.5 layout (the keys every SD1.5 .ckpt has)
    table = unet_block_table(_UNET_DEFAULTS)
    assert unet_name_to_sgm("down_blocks.0.downsamplers.0.conv.weight", table) == "input_blocks.3.0.op.weight"
    assert unet_name_to_sgm("up_blocks.0.upsamplers.0.conv.bias", table) == "output_blocks.2.1.conv.bias"
    assert unet_name_to_sgm("up_blocks.1.upsamplers.0.conv.weight", table) == "output_blocks.5.2.conv.weight"
    assert unet_name_to_sgm("up_blocks.3.resnets.2.conv_shortcut.weight", table) == (
        "output_blocks.11.0.skip_connection.weight"
    )
    assert (
        unet_name_to_sgm("down_blocks.1.resnets.0.time_emb_proj.bias", table) == "input_blocks.4.0.emb_layers.1.bias"
    )


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_sgm_names_round_trip_through_diffusers_reader(layout):
    """Our diffusers→LDM/SGM table inverted by diffusers' own `convert_ldm_unet_checkpoint` gives back every key
    and tensor, on UNets with the real block structure (tiny channels)."""
    kw = dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=16, attention_head_dim=8, sample_size=8)
    if layout == "sdxl":
        kw = dict(block_out_channels=(32, 64, 64), cross_attention_dim=16, attention_head_dim=8, sample_size=8,
                  transformer_layers_per_block=(1, 2, 3), addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=56, use_linear_projection=True,
                  **_SDXL)  # fmt: skip
    unet = UNet2DConditionModel(**kw)
    state = unet.state_dict()
    ldm = {f"model.diffusion_model.{k}": v for k, v in unet_to_sgm(state, unet.config).items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def _comfy_unet_names(pipe) -> set[str]:
    """The LoRA module names ComfyUI's `model_lora_keys_unet` accepts for this UNet: `lora_unet_` + every original
    (SGM) weight name, and `lora_unet_` + every diffusers weight name (via `unet_to_diffusers`), dots → `_`. The SGM
    names are checked against diffusers' own reader in the round-trip test above."""
    state = pipe.unet.state_dict()
    sgm = unet_to_sgm(state, pipe.unet.config)
    names = {k for k in sgm if k.endswith(".weight")} | {k for k in state if k.endswith(".weight")}
    return {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in names}


@pytest.mark.parametrize("run_fixture", ["sd_run", "sdxl_run"])
def test_comfyui_rules_match_every_exported_module(run_fixture, request, tmp_path):
    """The defect: ComfyUI silently loaded 0 layers from our diffusers-format file. Every module of the kohya file
    must be one ComfyUI derives from the model; none of the native file's modules is (that is the bug)."""
    run_dir = request.getfixturevalue(run_fixture)
    accepted = _comfy_unet_names(DiffusionPipeline.from_pretrained(load_run(run_dir).base))
    file = export_run(run_dir, "kohya", tmp_path / "lora.safetensors")
    with safe_open(str(file), "pt") as f:
        modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}
    assert len(modules) == len(load_run(run_dir).lora) > 0
    assert modules <= accepted
    native_file = load_run(run_dir).source / "pytorch_lora_weights.safetensors"
    with safe_open(str(native_file), "pt") as f:
        native = {k.split(".lora")[0] for k in f.keys()}
    # ComfyUI's diffusers rule wants `unet.<path>.processor.to_q` etc.; ours never matches
    comfy_diffusers = {"unet." + k.replace(".to_", ".processor.to_").removesuffix(".0") for k in native}
    assert not (native & (accepted | comfy_diffusers))


def test_kohya_rejects_sd3_and_full_finetunes(tmp_path, tiny_sd_path):
    from diffalign.export.runs import RunWeights

    full = RunWeights(tmp_path, tmp_path, {"model": str(tiny_sd_path)}, "sd", denoiser_state={})
    with pytest.raises(ConfigError, match="needs a LoRA run"):
        export_run(full, "kohya", tmp_path / "x.safetensors")
    sd3 = RunWeights(tmp_path, tmp_path, {"model": "m"}, "sd3", lora={"transformer.a": (torch.zeros(1), None)})
    with pytest.raises(ConfigError, match="SD3 LoRAs"):
        export_run(sd3, "kohya", tmp_path / "x.safetensors")


# ---- runs: final/, checkpoint-N/ ---------------------------------------------------------------------------------
def test_checkpoint_of_a_real_run_exports_like_final(tiny_sd_path, tmp_path):
    """A real 2-step training with a checkpoint at step 2: the checkpoint's peft weights export to the same kohya
    tensors as final/; without final/ the base model is unknown and the error says what to pass."""
    from diffalign.trainers.dpo import DPOTrainer
    from helpers import tiny_config

    data = tmp_path / "pairs.parquet"
    _write_pairs(data)
    cfg = tiny_config(DPOTrainer, tiny_sd_path, data, tmp_path / "run", resolution=32, batch_size=2, beta=50.0,
                      lora_alpha=ALPHA, checkpointing_steps=2)  # fmt: skip
    DPOTrainer(cfg).train()
    final = export_run(tmp_path / "run", "kohya", tmp_path / "final.safetensors", dtype="fp32")
    ckpt = export_run(tmp_path / "run" / "checkpoint-2", "kohya", tmp_path / "ckpt.safetensors", dtype="fp32")
    with safe_open(str(final), "pt") as a, safe_open(str(ckpt), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert a.metadata()["ss_training_method"] == "dpo" == b.metadata()["ss_training_method"]
    lonely = tmp_path / "copy" / "checkpoint-2"
    shutil.copytree(tmp_path / "run" / "checkpoint-2", lonely)
    with pytest.raises(ConfigError, match="cannot tell the base model .*--config"):
        load_run(lonely)
    assert load_run(lonely, config=tmp_path / "run" / "final" / "config.yaml").lora_alpha == ALPHA


def _write_pairs(path):
    import io

    import pandas as pd
    from PIL import Image

    def jpeg(colour):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
        return buf.getvalue()

    row = {"caption": "a red square", "jpg_0": jpeg((255, 0, 0)), "jpg_1": jpeg((0, 0, 255)), "label_0": 1.0,
           "label_1": 0.0}  # fmt: skip
    pd.DataFrame([row] * 4).to_parquet(path)


def test_missing_run_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no trained weights"):
        load_run(tmp_path)


# ---- whole models ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "run_fixture,cls", [("sd_run", StableDiffusionPipeline), ("sdxl_run", StableDiffusionXLPipeline)]
)
def test_single_file_loads_in_stock_diffusers_with_same_images(run_fixture, cls, request, tmp_path):
    run_dir = request.getfixturevalue(run_fixture)
    file = export_run(run_dir, "single-file", tmp_path / "model.safetensors", dtype="fp32")
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    te = (
        "cond_stage_model.transformer.text_model."
        if run_fixture == "sd_run"
        else "conditioner.embedders.0.transformer."
    )
    assert any(k.startswith(te) for k in keys)
    if run_fixture == "sdxl_run":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    pipe = cls.from_single_file(str(file), config=load_run(run_dir).base, local_files_only=True)
    assert (_images(pipe) - _images(_native(run_dir))).abs().max() <= 1e-4


def test_diffusers_folder_with_card(sd_run, tmp_path):
    from huggingface_hub import ModelCard

    folder = export_run(sd_run, "diffusers", tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert (_images(pipe) - _images(_native(sd_run))).abs().max() <= 1e-4
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and "dpo" in card.data.tags
    assert "method **dpo**" in card.text and "| beta | 500.0 |" in card.text
    assert "7 optimizer steps" in card.text and "StableDiffusionPipeline.from_pretrained" in card.text


def test_full_finetune_exports(tiny_sd_path, tmp_path):
    """A full fine-tune's UNet (final/unet) goes into the folder and the single file."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(3.0)
    unet.save_pretrained(tmp_path / "run" / "final" / "unet")
    (tmp_path / "run" / "final" / "config.yaml").write_text(
        yaml.safe_dump({"model": str(tiny_sd_path), "lora_rank": 0})
    )
    reference = DiffusionPipeline.from_pretrained(tiny_sd_path, unet=unet)
    file = export_run(tmp_path / "run", "single-file", tmp_path / "full.safetensors", dtype="fp32")
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(tiny_sd_path), local_files_only=True)
    assert (_images(pipe) - _images(reference)).abs().max() <= 1e-4
    with pytest.raises(ConfigError, match="needs a LoRA run"):
        export_run(tmp_path / "run", "kohya", tmp_path / "x.safetensors")


# ---- lora folder, card, hub, CLI ----------------------------------------------------------------------------------
def test_lora_folder_card_for_negative_adapter(sdxl_run, tmp_path):
    from huggingface_hub import ModelCard

    folder = export_run(sdxl_run, "lora", tmp_path / "neg", repo_id="me/neg")
    assert {p.name for p in folder.iterdir()} == {"README.md", "pytorch_lora_weights.safetensors",
                                                    "neg_kohya.safetensors"}  # fmt: skip
    card = ModelCard.load(folder / "README.md")
    assert "method **npo** (negative adapter δ)" in card.text
    assert "attach_negative_adapter" in card.text and "<lora:neg_kohya:1>" in card.text
    assert "unconditional branch" in card.text


def test_push_to_hub_offline_fails_fast_naming_the_repo(tmp_path, monkeypatch):
    from diffalign.export.hub import HubError, push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="'me/model'.*HF_HUB_OFFLINE"):
        push_to_hub(tmp_path, "me/model")


def test_cli_export_kohya_and_errors(sd_run, tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    out = tmp_path / "c.safetensors"
    result = CliRunner().invoke(app, ["export", str(sd_run), "--format", "kohya", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"kohya: {out}" in result.output
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("lora_up.weight"))).dtype == torch.float16
    bad = CliRunner().invoke(app, ["export", str(sd_run), "--format", "onnx", "--out", str(out)])
    assert isinstance(bad.exception, ConfigError) and "`--format` must be one of" in str(bad.exception)
