"""Optional dependencies: a missing one is a one-line error naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"open_clip": "eval", "tensorboard": "tensorboard", "wandb": "wandb", "bitsandbytes": "gpu",
          "xformers": "gpu", "fastapi": "collect", "uvicorn": "collect",
          "torchao": "quant"}  # fmt: skip


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message says which extra to install."""


def require(module: str, feature: str) -> ModuleType:
    """Import `module`, or raise `MissingDependencyError` naming `feature` and `pip install 'diffalign[<extra>]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module)
        how = f"pip install 'diffalign[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(f"{feature} needs `{module}`, which is not installed: {how}") from None
