"""Rewards on tiny random-weight models of the real architectures, checked against hand computation.

open_clip: a tiny ViT config registered from a .json file (the HPS / open_clip path); transformers: a tiny
`CLIPConfig` saved with a word-level tokenizer and a `CLIPImageProcessor` config (the PickScore path).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign import rewards
from diffalign.rewards.aesthetic import AestheticMLP
from diffalign.rewards.base import MissingWeightsError
from diffalign.rewards.clip_models import clip_preprocess, cosine_scores
from diffalign.toyworld.tokenizer import write_word_tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WORDS = ["a", "cat", "dog", "red", "blue", "square", "circle", "on", "green"]
PROMPTS = ["a red square", "a blue circle", "a cat on green"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On the shared 2-core test machine, OpenMP threads spinning against other processes made tiny forward
    passes 100× slower; one thread is fastest for these tiny models. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class NotATensor:
    """Stands for the optimizer / args objects some checkpoints pickle next to the weights."""


# ---- tiny models --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """(config .json path, a random open_clip model of that config, its weights saved HPS-style)."""
    import open_clip

    from diffalign.rewards.clip_models import register_open_clip_config

    root = tmp_path_factory.mktemp("open_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    config = root / "tiny-test-clip.json"
    config.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(register_open_clip_config(str(config))).eval()
    checkpoint = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return str(config), model, str(checkpoint)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A transformers CLIP folder (model + tokenizer + image processor) and the model itself."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("hf_clip")
    tok = write_word_tokenizer(WORDS, folder)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, **ids)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={**text, "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={**vision, "num_attention_heads": 2},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder), model, tok


def _normalize(images):
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def images32():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- registry -----------------------------------------------------------------------------------------------------
def test_registry_lists_builtins_and_rejects_unknown_names():
    assert rewards.available() == ["aesthetic", "clip", "hps", "pickscore", "toy"]
    with pytest.raises(ValueError, match="unknown reward 'hpsv3'; available: aesthetic, clip, hps, pickscore, toy"):
        rewards.create("hpsv3")
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("hps")(lambda **kw: None)


def test_parse_spec_labels():
    assert rewards.parse_spec("toy") == ("toy", "toy", {})
    assert rewards.parse_spec({"name": "hps", "version": "v2.0", "checkpoint": "x.pt"}) == (
        "hps_v2.0",
        "hps",
        {"version": "v2.0", "checkpoint": "x.pt"},
    )
    assert rewards.parse_spec({"name": "clip", "label": "clip_b32"})[0] == "clip_b32"
    with pytest.raises(ValueError, match="`name` key"):
        rewards.parse_spec({"checkpoint": "x.pt"})


# ---- pure math ----------------------------------------------------------------------------------------------------
def test_cosine_scores_by_hand():
    e = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[6.0, 8.0], [0.0, 2.0], [-5.0, 0.0], [1.0, 0.0]])
    # identical direction → the maximum (scale), orthogonal → 0, opposite → -scale, 45° → scale/√2
    expected = torch.tensor([100.0, 0.0, -100.0, 100.0 / 2**0.5])
    torch.testing.assert_close(cosine_scores(e, t, scale=100.0), expected)
    torch.testing.assert_close(cosine_scores(e, t, scale=100.0, min_value=0.0), expected.clamp_min(0))


def test_clip_preprocess_resizes_shortest_side_crops_and_normalizes():
    img = torch.full((3, 40, 80), 0.5)  # constant image: resizing keeps the value, so the output is known exactly
    img[:, :, :20] = 0.0  # left quarter black: cropped away by the center crop after resizing to 32×64
    out = clip_preprocess([img], size=32, mean=OPENAI_MEAN, std=OPENAI_STD)
    assert out.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(out[0, :, 4:-4, 4:-4].mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)


def test_aesthetic_mlp_layout_matches_the_released_head():
    keys = {k: tuple(v.shape) for k, v in AestheticMLP(768).state_dict().items()}
    assert keys == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }


# ---- HPS (open_clip) ----------------------------------------------------------------------------------------------
def test_hps_is_100_cos_of_the_checkpoint_model(tiny_open_clip, images32):
    config, model, checkpoint = tiny_open_clip
    reward = rewards.create("hps", checkpoint=checkpoint, model_name=config, device="cpu", batch_size=2)
    scores = reward(images32, PROMPTS)

    import open_clip

    with torch.no_grad():  # by hand: 32×32 inputs need no resize, only normalisation
        img = F.normalize(model.encode_image(_normalize(images32)), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("tiny-test-clip")(PROMPTS)), dim=-1)
    expected = 100 * (img * txt).sum(-1)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    assert reward.name == "hps" and reward.scale == 100.0


def test_hps_identical_embeddings_score_100(tiny_open_clip, tmp_path, images32):
    """Collapse both towers onto the same vector: LayerNorm weight 0 makes each output its bias, and the same bias
    through the same projection gives identical image and text embeddings for every input → 100 · cos = 100."""
    config, model, _ = tiny_open_clip
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bias = torch.randn(32)
    for ln in ("visual.ln_post", "ln_final"):
        state[f"{ln}.weight"] = torch.zeros(32)
        state[f"{ln}.bias"] = bias
    state["text_projection"] = state["visual.proj"].clone()
    path = tmp_path / "collapsed.pt"
    torch.save({"state_dict": state}, path)
    reward = rewards.create("hps", checkpoint=str(path), model_name=config, device="cpu")
    torch.testing.assert_close(reward(images32, PROMPTS), torch.full((3,), 100.0), atol=1e-3, rtol=0)


def test_pil_and_tensor_inputs_agree_and_batching_does_not_matter(tiny_open_clip, images32):
    config, _, checkpoint = tiny_open_clip
    quantized = (images32 * 255).round() / 255
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images32]
    one = rewards.create("hps", checkpoint=checkpoint, model_name=config, device="cpu", batch_size=1)
    many = rewards.create("hps", checkpoint=checkpoint, model_name=config, device="cpu", batch_size=16)
    torch.testing.assert_close(one(pil, PROMPTS), many(quantized, PROMPTS), atol=1e-4, rtol=0)


def test_reward_input_errors(tiny_open_clip, images32):
    config, _, checkpoint = tiny_open_clip
    reward = rewards.create("hps", checkpoint=checkpoint, model_name=config, device="cpu")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\(x \+ 1\) / 2"):
        reward(images32 * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match=r"one entry per image \(3\), got 2"):
        reward(images32, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"must be \[N, 3, H, W\]"):
        reward(images32[0], PROMPTS[:1])


def test_hps_bf16_is_close_to_fp32(tiny_open_clip, images32):
    config, _, checkpoint = tiny_open_clip
    fp32 = rewards.create("hps", checkpoint=checkpoint, model_name=config, device="cpu")(images32, PROMPTS)
    bf16 = rewards.create("hps", checkpoint=checkpoint, model_name=config, device="cpu", dtype="bf16")
    assert next(bf16.encoder.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16(images32, PROMPTS), fp32, atol=2.0, rtol=0)


def test_hps_missing_weights_offline_say_which_file_to_pass(tiny_open_clip, tmp_path):
    config = tiny_open_clip[0]
    with pytest.raises(MissingWeightsError, match=r"HPS_v2_compressed.pt.*pass `checkpoint=/path/to/HPS_v2_comp"):
        rewards.create("hps", version="v2.0", model_name=config)
    with pytest.raises(MissingWeightsError, match=r"does not exist; pass `checkpoint=/path/to/HPS_v2.1_compressed"):
        rewards.create("hps", checkpoint=str(tmp_path / "nope.pt"), model_name=config)
    with pytest.raises(ValueError, match=r"`version` must be one of \['v2.0', 'v2.1'\], got 'v3'"):
        rewards.create("hps", version="v3")


def _refused_unless_allowed(name: str, weights_key: str, state: dict, safe_file: str, tmp_path, images32, **kw):
    """A checkpoint that needs full unpickling is refused, loads with `allow_unsafe_pickle=True` (and a warning),
    and then scores like the same weights saved safely."""
    path = tmp_path / f"{name}_with_objects.pt"
    torch.save({"state_dict": state, "args": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True.*pass `allow_unsafe_pickle=True`"):
        rewards.create(name, **{weights_key: str(path)}, **kw)
    with pytest.warns(UserWarning, match="full unpickling"):
        unsafe = rewards.create(name, **{weights_key: str(path)}, allow_unsafe_pickle=True, **kw)
    safe = rewards.create(name, **{weights_key: safe_file}, **kw)
    torch.testing.assert_close(unsafe(images32, PROMPTS), safe(images32, PROMPTS))


def test_checkpoints_load_weights_only_unless_explicitly_allowed(tiny_open_clip, tmp_path, images32):
    config, model, checkpoint = tiny_open_clip
    _refused_unless_allowed("hps", "checkpoint", model.state_dict(), checkpoint, tmp_path, images32, model_name=config)


def test_hps_checkpoint_of_another_architecture_is_a_clear_error(tiny_open_clip, tmp_path):
    config, model, _ = tiny_open_clip
    path = tmp_path / "partial.pt"
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}}, path)
    with pytest.raises(ValueError, match="does not fit open_clip `model_name` 'tiny-test-clip'"):
        rewards.create("hps", checkpoint=str(path), model_name=config)


# ---- PickScore / CLIP / aesthetic (transformers) ------------------------------------------------------------------
def _hf_embeds(model, tok, images, prompts):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_normalize(images))
        ids = tok(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_pickscore_is_logit_scale_times_cos(tiny_hf_clip, images32):
    folder, model, tok = tiny_hf_clip
    reward = rewards.create("pickscore", model=folder, device="cpu")
    img, txt = _hf_embeds(model, tok, images32, PROMPTS)
    expected = model.logit_scale.exp().item() * (img * txt).sum(-1)
    assert reward.scale == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial logit scale, exp(log(1/0.07))
    torch.testing.assert_close(reward(images32, PROMPTS), expected, atol=1e-4, rtol=0)
    bf16 = rewards.create("pickscore", model=folder, device="cpu", dtype="bf16")
    assert bf16.encoder.model.dtype == torch.bfloat16
    torch.testing.assert_close(bf16(images32, PROMPTS), expected, atol=0.5, rtol=0)


def test_pickscore_identical_embeddings_score_logit_scale(tiny_hf_clip, tmp_path, images32):
    from transformers import CLIPModel

    folder, model, tok = tiny_hf_clip
    collapsed = CLIPModel(model.config).eval()
    collapsed.load_state_dict(model.state_dict())
    bias = torch.randn(32)
    with torch.no_grad():
        for ln in (collapsed.vision_model.post_layernorm, collapsed.text_model.final_layer_norm):
            ln.weight.zero_()
            ln.bias.copy_(bias)
        collapsed.text_projection.weight.copy_(collapsed.visual_projection.weight)
        collapsed.logit_scale.fill_(3.0)
    collapsed.save_pretrained(tmp_path)
    reward = rewards.create("pickscore", model=str(tmp_path), processor=folder, device="cpu")
    torch.testing.assert_close(reward(images32, PROMPTS), torch.full((3,), float(torch.tensor(3.0).exp())))


def test_pickscore_missing_weights_say_which_folder_to_pass(tiny_hf_clip, tmp_path):
    tiny_hf_clip[1].save_pretrained(tmp_path / "weights_only")  # config + weights, no tokenizer/processor files
    with pytest.raises(MissingWeightsError, match=r"no tokenizer files .* pass `processor=`"):
        rewards.create("pickscore", model=str(tmp_path / "weights_only"))
    with pytest.raises(MissingWeightsError, match=r"does not exist; pass `model=/path/to/PickScore_v1`"):
        rewards.create("pickscore", model=str(tmp_path / "PickScore_v1"))
    with pytest.raises(MissingWeightsError, match=r"'yuvalkirstain/PickScore_v1' could not be loaded.*pass `model="):
        rewards.create("pickscore")  # offline, not in the hub cache


def test_clip_score_clamps_negative_cosines(tiny_hf_clip, tiny_open_clip, images32):
    folder, model, tok = tiny_hf_clip
    img, txt = _hf_embeds(model, tok, images32, PROMPTS)
    hf = rewards.create("clip", model=folder, device="cpu")
    torch.testing.assert_close(hf(images32, PROMPTS), (100 * (img * txt).sum(-1)).clamp_min(0), atol=1e-4, rtol=0)
    config, _, checkpoint = tiny_open_clip
    oc = rewards.create("clip", model_name=config, pretrained=checkpoint, scale=2.5, device="cpu")
    hps = rewards.create("hps", checkpoint=checkpoint, model_name=config, device="cpu")
    torch.testing.assert_close(oc(images32, PROMPTS), (hps(images32, PROMPTS) / 40).clamp_min(0))
    with pytest.raises(ValueError, match="either `model`"):
        rewards.create("clip", model=folder, model_name=config)


def test_aesthetic_is_mlp_of_normalized_image_embedding(tiny_hf_clip, tmp_path, images32):
    folder, model, tok = tiny_hf_clip
    torch.manual_seed(2)
    head = AestheticMLP(in_dim=16)
    head_path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), head_path)
    reward = rewards.create("aesthetic", head=str(head_path), model=folder, device="cpu")
    img, _ = _hf_embeds(model, tok, images32, PROMPTS)
    with torch.no_grad():
        layers = [head.layers[i] for i in (0, 2, 4, 6, 7)]  # dropout is identity at eval; no activations
        expected = img
        for layer in layers:
            expected = expected @ layer.weight.T + layer.bias
    scores = reward(images32, ["ignored"] * 3)
    torch.testing.assert_close(scores, expected.squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(reward(images32, PROMPTS), scores)  # the prompt plays no part


def test_aesthetic_head_honours_allow_unsafe_pickle(tiny_hf_clip, tmp_path, images32):
    """The head loader used to ignore `allow_unsafe_pickle` (every other checkpoint loader honours it)."""
    head = AestheticMLP(in_dim=16)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    state, safe = head.state_dict(), str(tmp_path / "head.pth")
    _refused_unless_allowed("aesthetic", "head", state, safe, tmp_path, images32, model=tiny_hf_clip[0])


def test_aesthetic_missing_head_says_which_file_to_pass(tiny_hf_clip, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"pass `head=/path/to/sac\+logos\+ava1-l14-linearMSE.pth`"):
        rewards.create("aesthetic", model=tiny_hf_clip[0])
    with pytest.raises(MissingWeightsError, match="aesthetic head .* does not exist"):
        rewards.create("aesthetic", head=str(tmp_path / "head.pth"), model=tiny_hf_clip[0])


# ---- toy ----------------------------------------------------------------------------------------------------------
def test_toy_reward_wraps_the_toy_world_reward():
    toyworld = pytest.importorskip("diffalign.toyworld")
    from diffalign.rewards.base import pil_to_tensor

    prompts = list(toyworld.prompts("heldout"))[:5]
    pil = [toyworld.render(p, rng=i) for i, p in enumerate(prompts)]
    tensors = torch.stack([pil_to_tensor(im) for im in pil])
    expected = toyworld.toy_reward(tensors, prompts).float()
    reward = rewards.create("toy", batch_size=2)
    torch.testing.assert_close(reward(tensors, prompts), expected)
    torch.testing.assert_close(reward(pil, prompts), expected)
    assert reward(tensors, prompts[1:] + prompts[:1]).mean() < expected.mean()  # wrong captions score lower
