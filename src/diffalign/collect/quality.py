"""Quality of the collected labels: do people agree with each other, with themselves, and with a reward model?

- **Inter-labeller agreement**: over every pair that two labellers both judged (left / right / tie), the fraction
  of those labeller pairs whose choices match.
- **Self-consistency**: a repeated pair shows the same images with the sides swapped; a labeller is consistent when
  the repeat's choice is the mirror of the original's (left ↔ right, tie ↔ tie).
- **Reward agreement**: over left/right choices whose candidates have reward scores, the fraction where the chosen
  image scores higher.
Each comes with its count `n`; a metric with nothing to measure is `None`.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

MIRROR = {"left": "right", "right": "left", "tie": "tie"}
PREFERENCES = ("left", "right", "tie")


def quality(labels) -> dict:
    """`labels`: rows of `LabelStore.labelled()` (mappings with pair_id, repeat_of, labeller, choice, rewards)."""
    return {
        "inter_labeller_agreement": _inter_labeller(labels),
        "self_consistency": _self_consistency(labels),
        "reward_agreement": _reward_agreement(labels),
    }


def _rate(hits: int, n: int) -> dict:
    return {"rate": hits / n if n else None, "n": n}


def _inter_labeller(labels) -> dict:
    by_pair: dict[int, dict[str, str]] = defaultdict(dict)
    for row in labels:
        if row["repeat_of"] is None and row["choice"] in PREFERENCES:
            by_pair[row["pair_id"]][row["labeller"]] = row["choice"]
    hits = n = 0
    for choices in by_pair.values():
        for a, b in combinations(sorted(choices), 2):
            n += 1
            hits += choices[a] == choices[b]
    return _rate(hits, n)


def _self_consistency(labels) -> dict:
    first = {(row["pair_id"], row["labeller"]): row["choice"] for row in labels if row["repeat_of"] is None}
    hits = n = 0
    for row in labels:
        original = first.get((row["repeat_of"], row["labeller"])) if row["repeat_of"] is not None else None
        if original in PREFERENCES and row["choice"] in PREFERENCES:
            n += 1
            hits += MIRROR[original] == row["choice"]
    return _rate(hits, n)


def _reward_agreement(labels) -> dict:
    hits = n = 0
    for row in labels:
        left, right = row["left_reward"], row["right_reward"]
        if row["choice"] in ("left", "right") and left is not None and right is not None and left != right:
            n += 1
            hits += (left > right) == (row["choice"] == "left")
    return _rate(hits, n)
