"""Plug-ins by entry point: how a package (the toy world included) adds a reward, a model alias, a prompt set or a
perturbation vocabulary without diffalign importing it.

A package declares, in its `pyproject.toml`,

    [project.entry-points."diffalign.rewards"]
    mine = "mypkg.rewards:make_reward"          # create("mine", ...) calls make_reward(**kwargs)

and the registries look the name up here when it is not built in. Groups: `diffalign.rewards` (reward factory),
`diffalign.models` (no-argument function → pipeline folder, for `--model NAME`), `diffalign.prompts` (function of
the part after `NAME:` → list of prompts, for `--prompts NAME:split`), `diffalign.vocabularies` (no-argument
function → list of words, for `perturb --vocabulary NAME`). diffalign's own toy world is registered this way.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

GROUPS = ("rewards", "models", "prompts", "vocabularies")


def names(group: str) -> list[str]:
    """Plug-in names in `diffalign.<group>`, sorted."""
    return sorted({ep.name for ep in entry_points(group=f"diffalign.{group}")})


def load(group: str, name: str) -> Any | None:
    """The object the entry point `name` of `diffalign.<group>` points to, or None if there is none."""
    for ep in entry_points(group=f"diffalign.{group}"):
        if ep.name == name:
            return ep.load()
    return None
