"""The toy world: split, rendering, the toy reward, the tokenizer and the shipped pipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from diffalign.toyworld import (
    COLOURS,
    RESOLUTION,
    SAMPLING,
    SHAPES,
    VOCABULARY,
    caption,
    parse_caption,
    pipeline_path,
    prompts,
    render,
    score_pipeline,
    toy_components,
    toy_reward,
)


def as_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(img) for img in images])).permute(0, 3, 1, 2).float() / 255


# ---- world ----------------------------------------------------------------------------------------------------------
def test_split_is_fixed_disjoint_and_covers_every_word():
    train, heldout = prompts("train"), prompts("heldout")
    assert (len(train), len(heldout)) == (162, 54)
    assert len(set(train)) == len(train) and not set(train) & set(heldout)
    assert len(COLOURS) >= 6 and set(SHAPES) >= {"circle", "square", "triangle"}
    assert heldout[:2] == ["a red circle on a green background", "a red circle on a grey background"]
    train_words = {w for p in train for w in p.split()}
    assert {w for p in heldout for w in p.split()} <= train_words == set(VOCABULARY)
    parsed_train = {parse_caption(p) for p in train}
    for shape, colour, background in map(parse_caption, heldout):
        assert (shape, background, colour) in parsed_train  # the colour-swapped twin is trained on: a binding test
        assert any(s == shape and c == colour for s, c, _ in parsed_train)


def test_prompts_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"`split` must be one of \['train', 'heldout'\], got 'test'"):
        prompts("test")


def test_caption_round_trip_and_errors():
    assert caption("circle", "red", "blue") == "a red circle on a blue background"
    assert parse_caption("A red circle on a blue background ") == ("circle", "red", "blue")
    with pytest.raises(ValueError, match="`shape` must be one of"):
        parse_caption("a red star on a blue background")
    with pytest.raises(ValueError, match="`colour` and `background` must differ, got 'red'"):
        caption("square", "red", "red")
    with pytest.raises(ValueError, match="must look like"):
        parse_caption("red circle, blue background")


def test_render_is_seeded_with_exact_colours():
    img = render("a pink triangle on a cyan background", rng=3)
    assert img.size == (RESOLUTION, RESOLUTION) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(render("a pink triangle on a cyan background", rng=3)))
    pixels = np.asarray(img).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    top_two = {tuple(int(v) for v in c) for c in colours[np.argsort(-counts)[:2]]}
    assert top_two == {COLOURS["pink"], COLOURS["cyan"]}
    border = np.concatenate([np.asarray(img)[:2].reshape(-1, 3), np.asarray(img)[-2:].reshape(-1, 3)])
    assert (border == COLOURS["cyan"]).all()


# ---- reward ---------------------------------------------------------------------------------------------------------
CASES = [  # (caption, wrong shape colour, wrong background) — includes the close pairs
    ("a red circle on a blue background", "brown", "purple"),
    ("a blue square on a grey background", "purple", "cyan"),
    ("a pink triangle on a green background", "red", "yellow"),
    ("a cyan circle on a brown background", "blue", "red"),
]


@pytest.mark.parametrize("text, wrong_colour, wrong_background", CASES)
def test_reward_prefers_the_right_image(text, wrong_colour, wrong_background):
    shape, colour, background = parse_caption(text)
    right = render(text, rng=0)
    bad_colour = render(caption(shape, wrong_colour, background), rng=0)
    bad_background = render(caption(shape, colour, wrong_background), rng=0)
    bad_shape = render(caption(next(s for s in SHAPES if s != shape), colour, background), rng=0)
    scores = toy_reward([right, bad_colour, bad_background, bad_shape], [text] * 4)
    assert scores[0] > 0.98
    assert 0.45 < scores[1] < 0.55  # loses the 0.5 colour term
    assert 0.70 < scores[2] < 0.80  # loses the 0.25 background term
    assert 0.70 < scores[3] < 0.80  # loses the 0.25 shape term
    parts = toy_components([right, bad_colour, bad_background, bad_shape], [text] * 4)
    assert parts["colour_correct"].tolist() == [1, 0, 1, 1]
    assert parts["background_correct"].tolist() == [1, 1, 0, 1]
    assert parts["shape_correct"].tolist() == [1, 1, 1, 0]
    assert parts["all_correct"].tolist() == [1, 0, 0, 0]


def test_reward_is_deterministic_bounded_and_accepts_pil_or_tensor():
    texts = prompts("heldout")[:12]
    rng = np.random.default_rng(1)
    images = [render(t, rng) for t in texts]
    noisy = (as_tensor(images) + 0.3 * torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    a, b = toy_reward(noisy, texts), toy_reward(noisy.clone(), texts)
    assert torch.equal(a, b) and a.shape == (12,) and a.dtype == torch.float32
    assert ((a >= 0) & (a <= 1)).all()
    assert torch.allclose(toy_reward(images, texts), toy_reward(as_tensor(images), texts))
    parts = toy_components(images, texts)
    assert all(parts[k].mean().item() == 1.0 for k in ("colour_correct", "background_correct", "shape_correct"))


def test_reward_on_a_blank_image_only_scores_the_background():
    blank = torch.tensor(COLOURS["blue"]).float().div(255).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    texts = ["a red circle on a blue background", "a red circle on a green background"]
    assert torch.allclose(toy_reward(blank, texts), torch.tensor([0.25, 0.0]), atol=1e-3)
    assert toy_components(blank, texts)["colour_correct"].tolist() == [0, 0]


def test_reward_errors():
    img = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"`prompts` must have one caption per image \(2\), got 1"):
        toy_reward(img, ["a red circle on a blue background"])
    with pytest.raises(ValueError, match=r"`images` must be in \[0, 1\]"):
        toy_reward(img * 2 - 1, ["a red circle on a blue background"] * 2)


# ---- shipped pipeline -----------------------------------------------------------------------------------------------
def test_shipped_tokenizer_has_one_token_per_word_and_distinct_captions():
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_path() / "tokenizer")
    for word in VOCABULARY:
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
        assert tokenizer.convert_tokens_to_ids(f"{word}</w>") != tokenizer.unk_token_id
    every = prompts("train") + prompts("heldout")
    ids = {tuple(tokenizer(p).input_ids) for p in every}
    assert len(ids) == len(every) == 216
    assert all(len(i) == 9 for i in ids)  # bos + 7 words + eos


def test_shipped_pipeline_is_small_and_standard():
    path = pipeline_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 20 * 2**20
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert SAMPLING == {"num_inference_steps": 20, "guidance_scale": 3.0}


def test_shipped_pipeline_loads_offline_and_binds_colours_imperfectly():
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())  # stock loader, HF_HUB_OFFLINE=1 (conftest)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    out = pipe(["a red circle on a blue background"], num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)
    stats = score_pipeline(pipe, prompts("heldout"), seeds_per_prompt=1)
    assert stats["num_images"] == 54
    # the shipped checkpoint (pipeline/README.md): right background most of the time, shape colour imperfect
    assert stats["background_correct"] > 0.6 and stats["shape_correct"] > 0.2
    assert 0.35 < stats["colour_correct"] < 0.9


def test_closest_colours_orders_the_palette_by_rgb_distance():
    from diffalign.toyworld import COLOURS, closest_colours

    # red (200, 40, 40): brown (135, 80, 40) at 5825, grey (128, 128, 128) at 20672, purple (135, 60, 175) at 22850
    assert closest_colours("red")[:3] == ["brown", "grey", "purple"]
    assert closest_colours("red", exclude=("grey",))[:2] == ["brown", "purple"]
    assert sorted(closest_colours("blue")) == sorted(c for c in COLOURS if c != "blue")
