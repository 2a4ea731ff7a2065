"""CLIP towers behind one small interface, from open_clip or transformers.

Both encoders turn images (`[3, H, W]` tensors in [0, 1]) and prompts into L2-normalised embeddings. Images are
preprocessed the CLIP way, in torch so it also works on tensors: resize the shortest side to the model's size
(bicubic, antialiased), center-crop a square, normalise with the model's mean/std. On PIL inputs this matches the
PIL-based transforms of open_clip / `CLIPImageProcessor` up to interpolation rounding.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffalign.optional import require

from .base import MissingWeightsError, check_local_path, looks_like_path, unsafe_pickle_error, warn_unsafe_pickle

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def clip_preprocess(
    images: Sequence[torch.Tensor], size: int, mean: Sequence[float], std: Sequence[float], crop: int | None = None
) -> torch.Tensor:
    """`[3, H, W]` images in [0, 1] → `[n, 3, crop, crop]`: shortest side resized to `size` (bicubic, antialias),
    center crop of `crop` (defaults to `size`), then `(x - mean) / std` per channel."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    crop = crop or size
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for image in images:
        image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [crop, crop]).clamp(0, 1)
        out.append((image - mean_t) / std_t)
    return torch.stack(out)


def cosine_scores(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float = 1.0, min_value: float | None = None
) -> torch.Tensor:
    """Row-wise `scale · cos(image_embeds[i], text_embeds[i])`, optionally clamped below at `min_value`.

    This is the HPS score (`scale = 100`), PickScore (`scale = exp(logit_scale)`) and CLIPScore
    (`scale = 100`, `min_value = 0`, as in torchmetrics; Hessel et al. 2021 use 2.5).
    """
    cos = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
    score = scale * cos
    return score.clamp_min(min_value) if min_value is not None else score


class OpenClipEncoder:
    """An open_clip CLIP model.

    Args:
        model_name (`str`): a built-in open_clip architecture (`"ViT-H-14"`) or a path to an open_clip model config
            `.json` (registered under its file stem; used by tests for tiny models).
        pretrained (`str`, *optional*): a weights file (state dict, optionally under `"state_dict"`) or an open_clip
            pretrained tag (resolved from the hub cache, or downloaded when online). `None` keeps random weights.
        missing_hint (`str`): the end of the error raised when the weights cannot be found.
        allow_unsafe_pickle (`bool`, *optional*, defaults to `False`): see `load_torch_checkpoint`.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        device: torch.device,
        dtype: torch.dtype,
        missing_hint: str = "pass `pretrained=/path/to/weights`",
        allow_unsafe_pickle: bool = False,
    ) -> None:
        open_clip = require("open_clip", "an open_clip reward (hps, aesthetic, clip)")

        model_name = register_open_clip_config(model_name)
        self.model = _create_open_clip(model_name, pretrained, missing_hint, allow_unsafe_pickle)
        self.model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"]
        self.size = size if isinstance(size, int) else size[0]
        self.mean, self.std = cfg["mean"], cfg["std"]
        self.device, self.dtype = device, dtype

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()

    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.size, self.mean, self.std).to(self.device, self.dtype)
        return self.model.encode_image(pixels, normalize=True).float()

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()


def register_open_clip_config(model_name: str) -> str:
    """A `.json` path is registered with open_clip (`add_model_config`) and replaced by its stem."""
    if not model_name.endswith(".json"):
        return model_name
    open_clip = require("open_clip", "an open_clip reward (hps, aesthetic, clip)")

    path = check_local_path(model_name, "open_clip model config", "pass `model_name` as a built-in or a .json file")
    cfg = json.loads(path.read_text())
    if open_clip.get_model_config(path.stem) != cfg:
        open_clip.add_model_config(path)
    return path.stem


def _create_open_clip(model_name: str, pretrained: str | None, missing_hint: str, allow_unsafe_pickle: bool):
    """open_clip's own loader (`torch.load(weights_only=True)`, `"state_dict"` unwrapping, strict key check)."""
    open_clip = require("open_clip", "an open_clip reward (hps, aesthetic, clip)")

    if model_name not in open_clip.list_models():
        raise ValueError(f"`model_name` {model_name!r} is not an open_clip architecture; see open_clip.list_models()")
    is_file = pretrained is not None and (looks_like_path(pretrained) or pretrained.endswith(WEIGHT_SUFFIXES))
    if is_file:
        check_local_path(pretrained, "weights file", missing_hint)
    try:
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, weights_only=True)
        except pickle.UnpicklingError:
            if not allow_unsafe_pickle:
                raise unsafe_pickle_error(pretrained) from None
            warn_unsafe_pickle(pretrained)
            return open_clip.create_model(model_name, pretrained=pretrained, weights_only=False)
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        if is_file:
            raise ValueError(f"{pretrained!r} does not fit open_clip `model_name` {model_name!r}: {first}") from None
        raise MissingWeightsError(
            f"open_clip weights {model_name}/{pretrained} are not available ({first}); {missing_hint}"
        ) from None


class HFClipEncoder:
    """A transformers `CLIPModel` with its tokenizer and `CLIPImageProcessor` settings.

    Args:
        model (`str`): a local folder (`config.json` + weights) or a hub id (cache when offline).
        processor (`str`, *optional*): folder or hub id holding the tokenizer and `preprocessor_config.json`;
            defaults to `model` (PickScore's processor is `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
        missing_hint (`str`): the end of the error raised when weights or processor cannot be found.
    """

    def __init__(
        self,
        model: str,
        processor: str | None,
        device: torch.device,
        dtype: torch.dtype,
        missing_hint: str = "pass `model=/path/to/clip_folder`",
    ) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        processor = processor or model
        self.model = _hf_load(CLIPModel, model, "CLIP model", missing_hint)
        self.model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.tokenizer = _hf_load(AutoTokenizer, processor, "tokenizer", "pass `processor=/path/to/folder`")
        _check_tokenizer(self.tokenizer, processor, self.model.config.text_config.vocab_size)
        image_processor = _hf_load(
            CLIPImageProcessor, processor, "image processor", "pass `processor=/path/to/folder`"
        )
        size = image_processor.size
        self.size = size.get("shortest_edge") or size["height"]
        self.crop = image_processor.crop_size["height"] if image_processor.do_center_crop else self.size
        self.mean, self.std = image_processor.image_mean, image_processor.image_std
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.device, self.dtype = device, dtype

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()

    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.size, self.mean, self.std, crop=self.crop)
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return F.normalize(_features(out).float(), dim=-1)

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(_features(out).float(), dim=-1)


def _check_tokenizer(tokenizer, source: str, vocab_size: int) -> None:
    """transformers builds an empty tokenizer from a folder without tokenizer files instead of failing: refuse it."""
    if len(tokenizer) < 10:
        raise MissingWeightsError(
            f"no tokenizer files (vocab.json + merges.txt or tokenizer.json) in {source!r}; pass `processor=` a "
            "folder or hub id that has them"
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer of {source!r} has {len(tokenizer)} tokens, the CLIP model only {vocab_size}")


def _features(out) -> torch.Tensor:
    """transformers ≥ 5 returns an output object whose `pooler_output` is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_load(cls, name: str, what: str, hint: str, **kwargs):
    if looks_like_path(name):
        check_local_path(name, what, hint)
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingWeightsError(f"{what} {name!r} could not be loaded ({first[:160]}); {hint}") from None


def load_clip_encoder(
    model: str | None,
    model_name: str | None,
    pretrained: str | None,
    processor: str | None,
    device: torch.device,
    dtype: torch.dtype,
    missing_hint: str,
    allow_unsafe_pickle: bool = False,
) -> OpenClipEncoder | HFClipEncoder:
    """`model` (a transformers folder / hub id) wins; otherwise open_clip `model_name` + `pretrained`."""
    if model is not None and model_name is not None:
        raise ValueError(
            f"pass either `model` (transformers CLIP, got {model!r}) or `model_name` (open_clip, got {model_name!r})"
        )
    if model is not None:
        return HFClipEncoder(model, processor, device, dtype, missing_hint)
    if model_name is None:
        raise ValueError("pass `model` (a transformers CLIP folder) or `model_name` (an open_clip architecture)")
    return OpenClipEncoder(model_name, pretrained, device, dtype, missing_hint, allow_unsafe_pickle)
