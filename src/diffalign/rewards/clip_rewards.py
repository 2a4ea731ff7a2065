"""CLIP-similarity rewards: HPS v2/v2.1, PickScore and CLIPScore.

All three are `scale · cos(image embedding, text embedding)`; they differ in the CLIP weights and the scale:

| reward      | model                                             | score                          |
|-------------|---------------------------------------------------|--------------------------------|
| `hps`       | open_clip ViT-H-14 + HPS checkpoint (Wu et al. 2023) | `100 · cos`                  |
| `pickscore` | transformers CLIP-H, PickScore_v1 (Kirstain et al. 2023) | `exp(logit_scale) · cos` (≈ 20–23) |
| `clip`      | any open_clip / transformers CLIP                 | `scale · max(cos, 0)`, scale 100 |
"""

from __future__ import annotations

import torch

from .base import Reward, hub_file, resolve_device, resolve_dtype
from .clip_models import HFClipEncoder, OpenClipEncoder, cosine_scores, load_clip_encoder
from .registry import register

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class CosineReward(Reward):
    """`scale · cos(img, text)` (clamped below at `min_value` if given) with a loaded CLIP `encoder`."""

    def __init__(
        self,
        encoder: OpenClipEncoder | HFClipEncoder,
        scale: float,
        min_value: float | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__(encoder.device, encoder.dtype, batch_size)
        self.encoder, self.scale, self.min_value = encoder, scale, min_value

    def score_batch(self, images: list[torch.Tensor], prompts: list[str]) -> torch.Tensor:
        image_embeds = self.encoder.encode_images(images)
        text_embeds = self.encoder.encode_texts(prompts)
        return cosine_scores(image_embeds, text_embeds, self.scale, self.min_value)


@register("hps")
def hps(
    version: str = "v2.1",
    checkpoint: str | None = None,
    model_name: str = "ViT-H-14",
    allow_unsafe_pickle: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> CosineReward:
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): `100 · cos(img, text)` of open_clip ViT-H-14 with the HPS
    weights, as in the HPSv2 benchmark.

    Args:
        version (`str`, *optional*, defaults to `"v2.1"`): `"v2.0"` or `"v2.1"`; picks the hub file when
            `checkpoint` is `None`.
        checkpoint (`str`, *optional*): `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` (state dict under
            `"state_dict"`); `None` → the hub cache of `xswu/HPSv2` (downloaded when online).
        model_name (`str`, *optional*, defaults to `"ViT-H-14"`): open_clip architecture or config `.json`.
        allow_unsafe_pickle (`bool`, *optional*, defaults to `False`): load a checkpoint that `weights_only=True`
            refuses (with a warning).
    """
    if version not in HPS_FILES:
        raise ValueError(f"`version` must be one of {list(HPS_FILES)}, got {version!r}")
    hint = f"pass `checkpoint=/path/to/{HPS_FILES[version]}` (from the hub repo {HPS_REPO})"
    if checkpoint is None:
        checkpoint = hub_file(HPS_REPO, HPS_FILES[version], hint)
    encoder = OpenClipEncoder(
        model_name, checkpoint, resolve_device(device), resolve_dtype(dtype), hint, allow_unsafe_pickle
    )
    return CosineReward(encoder, scale=100.0, batch_size=batch_size)


@register("pickscore")
def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> CosineReward:
    """PickScore v1 (Kirstain et al. 2023): `exp(logit_scale) · cos(img, text)` of a transformers CLIP-H fine-tuned on
    Pick-a-Pic; ≈ 20–23 for SD-class models.

    Args:
        model (`str`, *optional*, defaults to `"yuvalkirstain/PickScore_v1"`): local folder or hub id (cache offline).
        processor (`str`, *optional*): folder/hub id with the tokenizer and `preprocessor_config.json`; defaults to
            `model` (the original processor is `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
    """
    hint = "pass `model=/path/to/PickScore_v1` (a transformers CLIP folder) and, if it has no tokenizer, `processor=`"
    encoder = HFClipEncoder(model, processor, resolve_device(device), resolve_dtype(dtype), hint)
    return CosineReward(encoder, scale=encoder.logit_scale, batch_size=batch_size)


@register("clip")
def clip(
    model: str | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    processor: str | None = None,
    scale: float = 100.0,
    allow_unsafe_pickle: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> CosineReward:
    """CLIPScore: `scale · max(cos(img, text), 0)` (Hessel et al. 2021 use scale 2.5; torchmetrics and most T2I papers
    report scale 100).

    Args:
        model (`str`, *optional*): a transformers CLIP folder or hub id. If neither `model` nor `model_name` is given:
            `"openai/clip-vit-large-patch14"`.
        model_name (`str`, *optional*): an open_clip architecture (or config `.json`), with `pretrained` a weights
            file or an open_clip tag.
        scale (`float`, *optional*, defaults to 100.0): multiplier of the cosine.
    """
    if model is None and model_name is None:
        model = "openai/clip-vit-large-patch14"
    hint = (
        "pass `model=/path/to/clip_folder` (transformers) or `model_name=` + `pretrained=/path/to/weights` (open_clip)"
    )
    encoder = load_clip_encoder(
        model,
        model_name,
        pretrained,
        processor,
        resolve_device(device),
        resolve_dtype(dtype),
        hint,
        allow_unsafe_pickle,
    )
    return CosineReward(encoder, scale=scale, min_value=0.0, batch_size=batch_size)
