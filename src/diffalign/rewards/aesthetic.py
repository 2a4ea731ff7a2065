"""LAION improved aesthetic predictor (Schuhmann 2022): an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

    score = MLP(e / ‖e‖),   MLP: d → 1024 → 128 → 64 → 16 → 1   (d = 768 for ViT-L/14)

Layers (state-dict keys `layers.0/2/4/6/7`): Linear, Dropout 0.2, Linear, Dropout 0.2, Linear, Dropout 0.1, Linear,
Linear — no activations, as released. Scores are roughly on a 1–10 scale. The head file is
`sac+logos+ava1-l14-linearMSE.pth`; the text prompt is ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MissingWeightsError, Reward, check_local_path, load_torch_checkpoint, resolve_device, resolve_dtype
from .clip_models import HFClipEncoder, OpenClipEncoder, load_clip_encoder
from .registry import register

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The released head; `in_dim` is the CLIP embedding size (768 for ViT-L/14)."""

    def __init__(self, in_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """`embeds` `[n, d]` (already L2-normalised) → scores `[n]`."""
        return self.layers(embeds).squeeze(-1)


class AestheticReward(Reward):
    def __init__(self, encoder: OpenClipEncoder | HFClipEncoder, head: AestheticMLP, batch_size: int = 16) -> None:
        super().__init__(encoder.device, encoder.dtype, batch_size)
        self.encoder, self.head = encoder, head.eval().requires_grad_(False).to(encoder.device)

    def score_batch(self, images: list[torch.Tensor], prompts: list[str]) -> torch.Tensor:
        embeds = self.encoder.encode_images(images)  # L2-normalised, float32
        return self.head(embeds)


@register("aesthetic")
def aesthetic(
    head: str | None = None,
    model: str | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    processor: str | None = None,
    allow_unsafe_pickle: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> AestheticReward:
    """LAION improved aesthetic predictor.

    Args:
        head (`str`): the MLP state dict, `sac+logos+ava1-l14-linearMSE.pth` (LAION improved-aesthetic-predictor).
        model (`str`, *optional*): transformers CLIP ViT-L/14 folder or hub id; if neither `model` nor `model_name`
            is given: `"openai/clip-vit-large-patch14"` (the OpenAI weights the head was trained on).
        model_name, pretrained (`str`, *optional*): open_clip alternative (`"ViT-L-14"`, `"openai"` or a file).
    """
    if head is None:
        raise MissingWeightsError(f"the aesthetic reward needs its MLP head: pass `head=/path/to/{HEAD_FILE}`")
    head_path = check_local_path(head, "aesthetic head", f"pass `head=/path/to/{HEAD_FILE}`")
    state = load_torch_checkpoint(head_path, allow_unsafe_pickle=allow_unsafe_pickle)
    if "layers.0.weight" not in state:
        raise ValueError(f"`head` {head!r} is not an aesthetic MLP state dict (no `layers.0.weight`)")
    mlp = AestheticMLP(in_dim=state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    if model is None and model_name is None:
        model = "openai/clip-vit-large-patch14"
    hint = "pass `model=/path/to/clip-vit-large-patch14` (transformers) or `model_name=ViT-L-14` + `pretrained=FILE`"
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
    return AestheticReward(encoder, mlp, batch_size=batch_size)
