"""Evaluation: statistics on known inputs, prompt sets, paired-seed generation on a tiny pipeline, the full
`run_eval` / `score` / CLI path, reports."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import rewards
from diffalign.config import ConfigError, load_config
from diffalign.evaluation import (
    EvalConfig,
    bootstrap_ci,
    load_prompts,
    markdown_report,
    plot_metrics,
    read_prompt_file,
    run_eval,
    score_images,
    summarize,
    wilson_interval,
    win_rate,
)
from diffalign.evaluation import run as run_module
from diffalign.evaluation.generate import generate_images, load_pipeline, make_scheduler
from diffalign.evaluation.prompts import HPSV2_STYLES, flat
from diffalign.toyworld.demo import EVAL_SEEDS
from diffalign.toyworld.tokenizer import write_word_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On the shared 2-core test machine, OpenMP threads spinning against other processes made tiny forward
    passes 100× slower; one thread is fastest for these tiny models. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = ["a", "red", "blue", "green", "square", "circle", "on", "background", "cat", "dog"]


# ---- statistics ---------------------------------------------------------------------------------------------------
def test_summarize_by_hand():
    assert summarize([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "std": pytest.approx(1.2909944), "n": 4}
    assert summarize([[5.0]]) == {"mean": 5.0, "std": 0.0, "n": 1}


def test_win_rate_counts_ties_half():
    a = np.array([[3.0, 1.0], [2.0, 2.0], [0.0, 5.0]])
    b = np.array([[1.0, 2.0], [2.0, 2.0], [1.0, 4.0]])
    # outcomes [[1, 0], [.5, .5], [0, 1]] → 3 / 6
    result = win_rate(a, b, num_samples=500)
    assert result["win_rate"] == 0.5 and result["n"] == 6 and result["n_prompts"] == 3
    assert win_rate(b, a)["win_rate"] == 0.5
    assert win_rate(a + 10, b)["win_rate"] == 1.0 and win_rate(a + 10, b)["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="must pair up"):
        win_rate(a, b[:2])


def test_bootstrap_resamples_whole_prompts():
    # two prompts, one always won, one always lost: resampled means are 0, 0.5, 1 with prob 1/4, 1/2, 1/4
    outcome = np.array([[1.0] * 8, [0.0] * 8])
    assert bootstrap_ci(outcome, num_samples=4000, seed=0) == (0.0, 1.0)
    # identical per-prompt means → no prompt-level uncertainty, however the seeds disagree
    assert bootstrap_ci(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), seed=3) == (0.5, 0.5)
    # seeded: reproducible
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(20, 4)).astype(float)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)


def test_prompt_clustered_interval_is_wider_than_per_comparison():
    """Seeds of one prompt agree (easy/hard prompts): the prompt bootstrap must see 30 clusters, not 240 draws."""
    rng = np.random.default_rng(0)
    per_prompt = rng.integers(0, 2, size=30).astype(float)
    outcome = np.repeat(per_prompt[:, None], 8, axis=1)
    lo, hi = bootstrap_ci(outcome, seed=0)
    flat_lo, flat_hi = bootstrap_ci(outcome.reshape(-1, 1), seed=0)
    assert hi - lo > 2 * (flat_hi - flat_lo)
    wl, wh = wilson_interval(outcome.sum(), outcome.size)
    assert hi - lo > 2 * (wh - wl)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(1 - hi) and (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)


# ---- prompt sets --------------------------------------------------------------------------------------------------
def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"caption": "a dog"}]))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n"a dog"\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a cat", "a dog"], "label_0": [1, 0]}), tmp_path / "p.parquet")
    for ext in ("txt", "json", "jsonl", "parquet"):
        assert read_prompt_file(tmp_path / f"p.{ext}") == ["a cat", "a dog"], ext
    assert load_prompts(str(tmp_path / "p.txt")).items[1].image_name() == "00001.png"
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no `caption` column"):
        read_prompt_file(tmp_path / "bad.parquet")
    (tmp_path / "p.csv").write_text("a")
    with pytest.raises(ValueError, match=r"must be .txt, .json, .jsonl or .parquet"):
        read_prompt_file(tmp_path / "p.csv")


def _hps_folder(root, per_style=2):
    root.mkdir(parents=True, exist_ok=True)
    for style in HPSV2_STYLES:
        (root / f"{style}.json").write_text(json.dumps([f"a red square {i}" for i in range(per_style)]))
    return root


def test_hpsv2_benchmark_layout_and_pickapic(tmp_path):
    folder = _hps_folder(tmp_path / "benchmark", per_style=3)
    prompt_set = load_prompts(str(folder))
    assert prompt_set.name == "hpsv2" and len(prompt_set) == 12 and prompt_set.groups == list(HPSV2_STYLES)
    assert prompt_set.items[4].image_name() == "concept-art/00001.png"
    assert len(prompt_set.head(2)) == 8
    (folder / "photo.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks photo.json"):
        load_prompts(str(folder))

    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "pickapic"
    shards.mkdir()
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat"]}), shards / "test_unique-00000.parquet")
    pq.write_table(pa.table({"caption": ["a red square"]}), shards / "test_unique-00001.parquet")
    assert load_prompts(f"pickapic:{shards}").texts == ["a cat", "a dog", "a red square"]


def test_toy_prompt_sets_come_from_the_toy_world():
    toyworld = pytest.importorskip("diffalign.toyworld")
    assert load_prompts("toy:heldout").texts == list(toyworld.prompts("heldout"))
    assert load_prompts("toy:train").texts == list(toyworld.prompts("train"))


# ---- tiny pipeline ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A random SD-shaped pipeline (32×32 images, 16×16 latents) saved as a stock diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    tok = write_word_tokenizer(WORDS, root / "tok")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=32,
    )
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            **ids,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def tiny_lora_dir(tiny_pipeline_dir, tmp_path_factory):
    """A diffusers-format LoRA for the tiny UNet with random (non-zero) up weights, so it changes the images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    torch.manual_seed(1)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora")
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state)
    return out


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_paired_seeds_give_identical_images_whatever_the_batch(tiny_pipeline_dir, tmp_path):
    pipe = load_pipeline(str(tiny_pipeline_dir), scheduler="ddim")
    set_a = flat("a", ["a red square", "a blue circle", "a cat on green background"])
    set_b = flat("b", ["a cat on green background", "a red square"])  # other order, other batches
    kw = {"num_inference_steps": 2, "guidance_scale": 3.0}
    a = generate_images(pipe, set_a, [0, 1], tmp_path / "a", batch_size=4, **kw)
    b = generate_images(pipe, set_b, [1], tmp_path / "b", batch_size=1, **kw)
    assert sorted(p.relative_to(tmp_path / "a").as_posix() for p in a.values())[:2] == [
        "seed0/00000.png",
        "seed0/00001.png",
    ]
    # same model, same prompt, same seed → the same image, regardless of batch size and neighbours
    assert np.abs(_pixels(a[(0, 1)]) - _pixels(b[(1, 1)])).max() <= 1
    assert np.abs(_pixels(a[(2, 1)]) - _pixels(b[(0, 1)])).max() <= 1
    assert np.abs(_pixels(a[(0, 0)]) - _pixels(a[(0, 1)])).max() > 10  # another seed, another image
    assert _pixels(a[(0, 0)]).shape == (32, 32, 3)


def test_generation_resumes_without_regenerating(tiny_pipeline_dir, tmp_path):
    pipe = load_pipeline(str(tiny_pipeline_dir))
    prompts = flat("p", ["a red square", "a blue circle"])
    first = generate_images(pipe, prompts, [0], tmp_path, num_inference_steps=1, batch_size=2)
    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["prompt"])
        return pipe(*args, **kwargs)

    again = generate_images(counting, prompts, [0, 1], tmp_path, num_inference_steps=1, batch_size=8)
    assert calls == [["a red square", "a blue circle"]]  # only seed 1 was generated
    assert all(again[k].stat().st_mtime_ns == stamps[k] for k in stamps)


def test_scheduler_lora_and_setting_errors(tiny_pipeline_dir, tiny_lora_dir, tmp_path):
    base = load_pipeline(str(tiny_pipeline_dir), scheduler="euler")
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(make_scheduler("dpm++", base.scheduler.config)).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(ConfigError, match=r"`scheduler` must be one of \['ddim', .*got 'heun'"):
        make_scheduler("heun", base.scheduler.config)
    with pytest.raises(ConfigError, match="`resolution` must be divisible by 8, got 30"):
        generate_images(base, flat("p", ["a cat"]), [0], tmp_path, resolution=30)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="`lora` .* does not exist"):
        load_pipeline(str(tiny_pipeline_dir), lora=str(tmp_path / "nope"))

    lora_file = next(tiny_lora_dir.glob("*.safetensors"))
    prompts = flat("p", ["a red square"])
    kw = {"num_inference_steps": 2, "guidance_scale": 1.0}
    plain = generate_images(load_pipeline(str(tiny_pipeline_dir)), prompts, [0], tmp_path / "plain", **kw)
    lora = generate_images(
        load_pipeline(str(tiny_pipeline_dir), lora=str(lora_file)), prompts, [0], tmp_path / "l", **kw
    )
    assert np.abs(_pixels(plain[(0, 0)]) - _pixels(lora[(0, 0)])).max() > 0


# ---- run_eval / score / CLI ---------------------------------------------------------------------------------------
@pytest.fixture()
def brightness_reward():
    """A reward whose value is checkable by hand: the mean pixel value × 10."""

    class Brightness(rewards.Reward):
        def score_batch(self, images, prompts):
            return torch.stack([im.mean() * 10 for im in images])

    rewards.register("test_brightness")(lambda **kw: Brightness(device="cpu", batch_size=kw.get("batch_size", 16)))
    yield "test_brightness"
    rewards.registry._REGISTRY.pop("test_brightness")


def _eval_yaml(tmp_path, pipe_dir, lora_dir, prompts):
    cfg = {
        "models": {"base": {"model": str(pipe_dir)}, "twin": str(pipe_dir), "lora": {"model": str(pipe_dir)}},
        "baseline": "base",
        "prompts": str(prompts),
        "rewards": ["test_brightness"],
        "seeds": [0, 1],
        "num_inference_steps": 2,
        "guidance_scale": 2.0,
        "scheduler": "ddim",
        "resolution": 32,
        "out": str(tmp_path / "out"),
        "device": "cpu",
        "grid_prompts": 3,
        "bootstrap_samples": 200,
    }
    cfg["models"]["lora"]["lora"] = str(lora_dir)
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_run_eval_end_to_end(tiny_pipeline_dir, tiny_lora_dir, brightness_reward, tmp_path, monkeypatch):
    prompts = _hps_folder(tmp_path / "benchmark", per_style=1)
    config = _eval_yaml(tmp_path, tiny_pipeline_dir, tiny_lora_dir, prompts)
    cfg = load_config(EvalConfig, config, ["--batch_size", "8"])
    results = run_eval(cfg)
    out = tmp_path / "out"

    # HPSv2 layout per seed; the twin (same weights, same seeds) made byte-identical images
    base_img = out / "images" / "base" / "seed1" / "paintings" / "00000.png"
    assert base_img.is_file()
    assert np.array_equal(_pixels(base_img), _pixels(out / "images" / "twin" / "seed1" / "paintings" / "00000.png"))

    # scores by hand from the PNGs
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 * 2
    by_hand = {m: [10 * _pixels(out / r["image"]).mean() / 255 for r in rows if r["model"] == m] for m in cfg.models}
    for model, values in by_hand.items():
        stats = results["models"][model]["test_brightness"]
        assert stats["n"] == 8
        assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-4)
        assert stats["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)

    wins = results["win_rates"]
    assert list(wins) == ["twin vs base", "lora vs base"]
    assert wins["twin vs base"]["test_brightness"] == {"win_rate": 0.5, "ci95": [0.5, 0.5], "n": 8, "n_prompts": 4}
    lora, base = np.array(by_hand["lora"]), np.array(by_hand["base"])
    expected = np.mean((lora > base) + 0.5 * (lora == base))
    assert wins["lora vs base"]["test_brightness"]["win_rate"] == pytest.approx(expected)
    assert set(results["by_group"]["base"]) == set(HPSV2_STYLES)
    assert results["settings"]["num_prompts"] == 4 and results["settings"]["seeds"] == [0, 1]

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["models"] == results["models"] and on_disk["win_rates"] == results["win_rates"]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (220 + 3 * 128, 24 + 3 * (128 + 14))  # rows of 128-px tiles, each with a caption strip
    assert "| model | test_brightness |" in (out / "report.md").read_text()

    # resume: nothing to generate, so no pipeline is loaded; same numbers
    monkeypatch.setattr(run_module, "load_pipeline", lambda *a, **k: pytest.fail("regenerated images"))
    assert run_eval(cfg)["models"] == results["models"]

    # `diffalign score` on one seed folder of the run gives the same per-image scores
    scored = score_images(out / "images" / "lora" / "seed0", str(prompts), ["test_brightness"], out=tmp_path / "s")
    lora_seed0 = [r for r in rows if r["model"] == "lora" and r["seed"] == 0]
    expected = {r["image"].split("seed0/")[1]: r["test_brightness"] for r in lora_seed0}
    got = {row["image"]: row["test_brightness"] for row in scored["images"]}
    assert got.keys() == {f"{s}/00000.png" for s in HPSV2_STYLES}
    assert all(got[k] == pytest.approx(expected[k], abs=1e-6) for k in got)
    assert (tmp_path / "s" / "scores.json").is_file()

    # changing a sampler setting must not silently mix old images with new ones
    with pytest.raises(ConfigError, match=r"other settings \(`num_inference_steps` 2 → 3\)"):
        run_eval(load_config(EvalConfig, config, ["--num_inference_steps", "3"]))


def test_cli_eval_and_score(tiny_pipeline_dir, tiny_lora_dir, brightness_reward, tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    config = _eval_yaml(tmp_path, tiny_pipeline_dir, tiny_lora_dir, prompts)
    runner = CliRunner()
    args = ["eval", "--config", str(config), "--models", f"{{base: {tiny_pipeline_dir}}}", "--seeds", "[3]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "base: test_brightness" in result.output
    assert (tmp_path / "out" / "images" / "base" / "seed3" / "00001.png").is_file()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["models"]) == ["base"] and results["win_rates"] == {}

    images = tmp_path / "out" / "images" / "base" / "seed3"
    result = runner.invoke(
        app, ["score", "--images", str(images), "--prompts", str(prompts), "--rewards", "test_brightness"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((images / "scores.json").read_text())["rewards"]["test_brightness"]["n"] == 2


def test_toy_eval_preset_runs_on_the_shipped_pipeline(tmp_path):
    """configs/eval_toy.yaml, base model only, 4 held-out prompts × 2 seeds (skipped until the pipeline ships)."""
    toyworld = pytest.importorskip("diffalign.toyworld")
    try:
        toyworld.pipeline_path()
    except FileNotFoundError:
        pytest.skip("the toy pipeline has not been built yet")
    overrides = ["--models", "{base: toy}", "--seeds", "[0, 1]", "--max_prompts", "4", "--out", str(tmp_path)]
    results = run_eval(load_config(EvalConfig, "eval_toy", overrides))
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    images = [Image.open(tmp_path / r["image"]).convert("RGB") for r in rows]
    by_hand = toyworld.toy_reward(images, [r["prompt"] for r in rows])
    assert results["models"]["base"]["toy"]["n"] == 8
    assert results["models"]["base"]["toy"]["mean"] == pytest.approx(by_hand.mean().item(), abs=1e-5)
    preset = load_config(EvalConfig, "eval_toy", ["--models", "{base: toy}"])  # the yaml restates these; keep in sync
    assert (preset.num_inference_steps, preset.guidance_scale) == tuple(toyworld.SAMPLING.values())
    assert preset.seeds == list(EVAL_SEEDS)


def test_eval_config_errors(tmp_path):
    cfg = load_config(EvalConfig, None, ["--models", "{a: /m, b: {model: /m, lora: /l.safetensors}}"])
    assert cfg.models["a"].model == "/m" and cfg.models["b"].lora == "/l.safetensors"
    with pytest.raises(ConfigError, match="`baseline` 'c' is not in `models` \\(a\\)"):
        load_config(EvalConfig, None, ["--models", "{a: x}", "--baseline", "c"])
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'seed' \\(did you mean 'seeds'\\?\\)"):
        load_config(EvalConfig, None, ["--models", "{a: x}", "--seed", "1"])
    with pytest.raises(ConfigError, match="`resolution` must be a positive multiple of 8, got 500"):
        load_config(EvalConfig, None, ["--models", "{a: x}", "--resolution", "500"])
    with pytest.raises(ConfigError, match="distinct ints"):
        load_config(EvalConfig, None, ["--models", "{a: x}", "--seeds", "[1, 1]"])
    twice = EvalConfig(models={"a": "x"}, rewards=["toy", {"name": "toy"}], out=str(tmp_path))
    with pytest.raises(ConfigError, match="duplicate labels \\['toy'\\]"):
        run_eval(twice)


def test_score_images_needs_matchable_names(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) match no prompt, e.g. \['cat.png'\]"):
        score_images(tmp_path, str(tmp_path / "prompts.txt"), ["toy"])


# ---- reports ------------------------------------------------------------------------------------------------------
def test_markdown_report_table():
    results = {
        "models": {
            "base": {"hps": {"mean": 25.0512, "std": 1.5, "n": 8}},
            "dpo": {"hps": {"mean": 26.5, "std": 1.25, "n": 8}},
        },
        "win_rates": {"dpo vs base": {"hps": {"win_rate": 0.75, "ci95": [0.5, 0.875], "n": 8}}},
    }
    text = markdown_report(results)
    assert "| base | 25.05 ± 1.5 |" in text and "| dpo | 26.5 ± 1.2 |" in text
    assert "| dpo vs base | 0.750 [0.500, 0.875] (n=8) |" in text


def test_plot_metrics(tmp_path):
    lines = [
        json.dumps({"step": s, "loss": 0.69 - 0.01 * s, "implicit_acc": 0.5 + 0.02 * s, "lr": 1e-5}) for s in range(10)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "metrics.png")
    with Image.open(png) as image:
        assert image.size[0] > image.size[1] > 100  # two panels side by side
    (tmp_path / "other.jsonl").write_text(json.dumps({"step": 1, "lr": 1.0}) + "\n")
    with pytest.raises(ValueError, match="has none of the keys \\['loss', 'implicit_acc'\\]"):
        plot_metrics(tmp_path / "other.jsonl", tmp_path / "x.png")


def test_generate_uses_the_models_own_sampler_defaults(tiny_sd_path):
    from diffalign import toyworld
    from diffalign.evaluation.generate import DEFAULT_SAMPLING, sampling_defaults

    assert sampling_defaults("toy") == {"num_inference_steps": 20, "guidance_scale": 3.0} == toyworld.SAMPLING
    assert sampling_defaults(str(tiny_sd_path)) == DEFAULT_SAMPLING


def test_eval_file_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    from diffalign.config import load_config
    from diffalign.evaluation import EvalConfig

    (tmp_path / "cfg" / "runs" / "dpo" / "final").mkdir(parents=True)
    (tmp_path / "cfg" / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "cfg" / "eval.yaml").write_text(
        "models:\n  base: {model: toy}\n  dpo: {model: toy, lora: runs/dpo/final}\n"
        "prompts: prompts.txt\nrewards: [toy, {name: hps, checkpoint: missing.pt}]\nout: results\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(EvalConfig, "cfg/eval.yaml")
    folder = (tmp_path / "cfg").resolve()
    assert cfg.models["dpo"].lora == str(folder / "runs/dpo/final") and cfg.models["dpo"].model == "toy"
    assert cfg.prompts == str(folder / "prompts.txt") and cfg.out == str(folder / "results")
    assert cfg.rewards == ["toy", {"name": "hps", "checkpoint": "missing.pt"}]  # absent files stay as written
    preset = load_config(EvalConfig, "eval_toy")
    assert not preset.out.startswith("/")  # shipped presets stay relative to the working directory


def test_grid_captions_each_tile(tmp_path):
    from diffalign.evaluation.report import CAPTION_HEIGHT, HEADER_HEIGHT, image_grid

    tile = Image.new("RGB", (32, 32), (200, 30, 30))
    plain = Image.open(image_grid([[tile, tile]], ["p"], ["a", "b"], tmp_path / "plain.png"))
    captioned = image_grid(
        [[tile, tile]], ["p"], ["a", "b"], tmp_path / "c.png", cell_labels=[["seed 0 · toy 0.5"] * 2]
    )
    captioned = Image.open(captioned)
    assert captioned.height == plain.height + CAPTION_HEIGHT == HEADER_HEIGHT + 128 + CAPTION_HEIGHT
    strip = np.asarray(captioned.convert("L"))[HEADER_HEIGHT + 128 :, 220:]
    assert (strip < 128).any()  # text was drawn under the tiles
