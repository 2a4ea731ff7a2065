"""Same math at any scale, one process: for every method, one optimizer step over the same global batch of 4 gives
the same update as batch 4 or batch 2 × accumulation 2 (the 2-process case is in test_distributed.py)."""

from __future__ import annotations

import pytest

import scale_cases
from diffalign.trainers import get_trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return scale_cases.write_data(tmp_path_factory.mktemp("scale"))


@pytest.mark.parametrize("method", scale_cases.METHODS)
def test_batch_equals_accumulation_for_every_method(method, tiny_sd_path, data, tmp_path):
    scale_cases.run(method, tiny_sd_path, data[method], tmp_path / "b4", batch_size=4, ga=1)
    scale_cases.run(method, tiny_sd_path, data[method], tmp_path / "b2ga2", batch_size=2, ga=2)
    a, b = scale_cases.trained(tmp_path / "b4"), scale_cases.trained(tmp_path / "b2ga2")
    assert max(v.abs().max().item() for v in a.values()) > 1e-4  # the step really moved the weights
    assert scale_cases.max_relative_difference(a, b) <= scale_cases.REL_TOL


def test_kto_micro_batch_scope_is_the_official_per_micro_step_point(tiny_sd_path, data, tmp_path):
    """The official code's reference point (per micro-step) does depend on the layout; `step` does not."""
    scale_cases.run("kto", tiny_sd_path, data["kto"], tmp_path / "b4", batch_size=4, ga=1, kl_scope="micro_batch")
    scale_cases.run("kto", tiny_sd_path, data["kto"], tmp_path / "ga", batch_size=2, ga=2, kl_scope="micro_batch")
    a, b = scale_cases.trained(tmp_path / "b4"), scale_cases.trained(tmp_path / "ga")
    assert scale_cases.max_relative_difference(a, b) > 10 * scale_cases.REL_TOL
    assert get_trainer("kto").config_class.model_fields["kl_scope"].default == "step"
