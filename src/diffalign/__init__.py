"""diffalign: align text-to-image diffusion models with human preferences.

Library entry points (lazy: `import diffalign` does not import torch):

>>> import diffalign
>>> final = diffalign.train("dpo", {"model": "path/to/sd15", "data": "pairs.parquet", "output_dir": "runs/dpo"})

`diffalign.train(method, config)` trains one method (a config object or a dict of keys) and returns `final/`;
`diffalign.load_config(cls, yaml, overrides)` builds a typed config; `diffalign.attach_negative_adapter(pipe, δ)`
puts an NPO / Self-NPO adapter into a stock pipeline's CFG branch.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("diffalign")
except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

_LAZY = {
    "train": ("diffalign.trainers", "train"),
    "get_trainer": ("diffalign.trainers", "get_trainer"),
    "load_config": ("diffalign.config", "load_config"),
    "build_config": ("diffalign.config", "build_config"),
    "attach_negative_adapter": ("diffalign.guidance", "attach_negative_adapter"),
    "load_backbone": ("diffalign.backbones", "load_backbone"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'diffalign' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
