"""Release the text encoders once every caption's embeddings are cached (`offload_text_encoders`).

`cache_latents` stores each caption's `encode_prompts` output and the empty prompt's (for caption dropout), so a
DPO/NPO/KTO/SmPO step never calls a text encoder again. `release_text_encoders` drops the backbone's references to
them (T5-XXL alone is 4.8 B parameters: 9.5 GB in bf16) and puts a stand-in in their place that raises one line if
anything still calls one (Self-NPO's unconditional input and TPO's mismatched captions are encoded at run time).
"""

from __future__ import annotations

import gc
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class ReleasedTextEncoder(nn.Module):
    """Stands where a released text encoder was; calling it is a one-line `ConfigError`."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.placeholder = nn.Parameter(torch.empty(0), requires_grad=False)  # `module_dtype`/`.to()` still work

    def forward(self, *args, **kwargs):
        from diffalign.config import ConfigError

        raise ConfigError(
            f"`{self.name}` was released after caching (`offload_text_encoders: true`), but this run still encodes "
            "prompts at training time (Self-NPO, TPO, validation images); set `offload_text_encoders: false`"
        )


def release_text_encoders(
    backbone, empty_text: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Replace every `text_encoder*` component of `backbone` (and the attributes or lists that point at it) with a
    `ReleasedTextEncoder`, free their memory, and return the cached empty-prompt embeddings `empty_text` on `device`
    with a batch dim (what `Trainer.empty_text` returns)."""
    components = getattr(backbone, "components", {})
    released = {name: m for name, m in components.items() if name.startswith("text_encoder") and m is not None}
    stand_ins = {id(m): ReleasedTextEncoder(name) for name, m in released.items()}
    for name, module in released.items():
        components[name] = stand_ins[id(module)]
    for attr, value in list(vars(backbone).items()):
        if id(value) in stand_ins:
            setattr(backbone, attr, stand_ins[id(value)])
        elif isinstance(value, list) and any(id(v) in stand_ins for v in value):
            setattr(backbone, attr, [stand_ins.get(id(v), v) for v in value])
    n_params = sum(p.numel() for m in released.values() for p in m.parameters())
    released.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("offload_text_encoders: released the text encoders (%.2fM parameters)", n_params / 1e6)
    return {k: v.unsqueeze(0).to(device) for k, v in empty_text.items()}
