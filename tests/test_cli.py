"""CLI conventions: fast lazy start, --version, python -m, env, the diffusers scripts' flag names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import diffalign
from diffalign.cli import app
from diffalign.config import ConfigError, load_config
from diffalign.trainers import METHODS, get_trainer


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_cli_and_help_do_not_import_torch():
    code = (
        "import sys\nfrom diffalign.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = _python(code)
    assert "train" in out and out.strip().endswith("NO-TORCH")


def test_python_m_version_and_clean_stdout():
    run = subprocess.run([sys.executable, "-m", "diffalign", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == f"diffalign {diffalign.__version__}\n"
    help_run = subprocess.run([sys.executable, "-m", "diffalign", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "Warning" not in help_run.stdout and help_run.stderr == ""


def test_train_help_lists_methods_and_keys():
    runner = CliRunner()
    listing = runner.invoke(app, ["train", "--help"])
    assert all(method in listing.output for method in METHODS)
    keys = runner.invoke(app, ["train", "kto", "--help"])
    assert keys.exit_code == 0 and "--beta" in keys.output and "desirable" in keys.output


@pytest.mark.parametrize("method", list(METHODS))
def test_method_table_matches_the_trainers(method):
    _, cls_name, config_name, summary = METHODS[method]
    cls = get_trainer(method)
    assert cls.__name__ == cls_name and cls.config_class.__name__ == config_name and cls.method == method
    assert summary.split(":")[0].lower().replace("-", "") in sys.modules[cls.__module__].__doc__.lower().replace(
        "-", ""
    )


def test_env_reports_versions_devices_and_kernels():
    result = CliRunner().invoke(app, ["env", "--json"])
    report = json.loads(result.output)
    assert report["packages"]["diffalign"] == diffalign.__version__
    assert report["packages"]["torch"] != "not installed"
    assert report["attention"]["sdpa"] is True and isinstance(report["cuda_devices"], list)
    assert set(report["mixed_precision"]) >= {"fp16", "bf16"}


def test_pasted_diffusers_dpo_command_line_builds_the_same_config():
    DPOConfig = get_trainer("dpo").config_class
    pasted = (
        "--pretrained_model_name_or_path m --dataset_name d --train_batch_size 4 --beta_dpo 2500 "
        "--max_train_steps 10 --rank 4 --use_8bit_adam --no_hflip --random_crop --resume_from_checkpoint latest "
        "--enable_xformers_memory_efficient_attention --learning_rate 1e-5 --output_dir out"
    ).split()
    native = (
        "--model m --data d --batch_size 4 --beta 5000 --max_steps 10 --lora_rank 4 --optimizer adamw8bit "
        "--random_flip false --center_crop false --resume latest --attention xformers --learning_rate 1e-5 "
        "--output_dir out"
    ).split()
    assert load_config(DPOConfig, "sd15_dpo_lora", pasted) == load_config(DPOConfig, "sd15_dpo_lora", native)


def test_alias_errors_are_one_line():
    DPOConfig = get_trainer("dpo").config_class
    with pytest.raises(ConfigError, match=r"`--rank` and `--lora_rank` name the same key"):
        load_config(DPOConfig, None, ["--model", "m", "--data", "d", "--rank", "4", "--lora_rank", "8"])
    with pytest.raises(ConfigError, match=r"`--num_train_epochs` .* not supported: use `--max_steps`"):
        load_config(DPOConfig, None, ["--model", "m", "--data", "d", "--num_train_epochs", "3"])
    with pytest.raises(ConfigError, match=r"'bta' \(did you mean 'beta'\?\) in command-line flags"):
        load_config(DPOConfig, "sd15_dpo_lora", ["--model", "m", "--data", "d", "--bta", "3"])


def test_library_entry_points_are_lazy_attributes():
    assert diffalign.train is __import__("diffalign.trainers", fromlist=["train"]).train
    assert callable(diffalign.attach_negative_adapter) and callable(diffalign.load_config)
    with pytest.raises(AttributeError):
        diffalign.no_such_thing  # noqa: B018


def test_flag_values_no_and_off_stay_strings_for_string_keys():
    DPOConfig = get_trainer("dpo").config_class
    cfg = load_config(DPOConfig, None, "--model m --data d --mixed_precision no --random_flip off".split())
    assert cfg.mixed_precision == "no" and cfg.random_flip is False


def test_missing_optional_packages_are_one_line_hints(monkeypatch, tmp_path):
    import sys

    from diffalign.optional import MissingDependencyError
    from diffalign.rewards import create

    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingDependencyError, match=r"needs `open_clip`, which is not installed: pip install 'diffa"):
        create("hps", checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    DPOConfig = get_trainer("dpo").config_class
    cfg = load_config(DPOConfig, None, ["--model", "toy", "--data", "x", "--report_to", "tensorboard"])
    with pytest.raises(MissingDependencyError, match=r"`report_to: tensorboard` needs .* 'diffalign\[tensorboard\]'"):
        get_trainer("dpo")(cfg).setup()
