"""Composed configs: experiments name a model file and start from the shared trainer defaults;
`--print_config` shows the resolved whole."""

from pathlib import Path

import pytest
import yaml

from experiments.run import main

CONFIGS = Path("experiments/configs")


def resolved(config: str, capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIGS / config), *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_resolves_the_model_file_and_the_trainer_defaults(capsys):
    meap = resolved("meap.yaml", capsys)
    model = yaml.safe_load((CONFIGS / "models" / "tiny_decoder.yaml").read_text())
    assert meap["model"]["class_path"] == model["class_path"]
    for key, value in model["init_args"].items():
        expected = value if key != "optimizer" else {**meap["model"]["init_args"]["optimizer"], **value}
        assert meap["model"]["init_args"][key] == expected
    defaults = yaml.safe_load((CONFIGS / "trainers" / "default.yaml").read_text())
    assert meap["seed_everything"] == defaults["seed_everything"]
    assert {k: meap["trainer"][k] for k in defaults["trainer"]} == defaults["trainer"]
    assert meap["trainer"]["callbacks"][0]["class_path"] == "callbacks.EvaluationCallback"  # the experiment's own
    # an experiment's own trainer key wins over the default, the other defaults stay
    sft = resolved("sft_meap.yaml", capsys)
    assert (sft["trainer"]["max_steps"], sft["trainer"]["gradient_clip_val"]) == (500, 1.0)
    assert resolved("meap.yaml", capsys, "--trainer.max_steps", "7")["trainer"]["max_steps"] == 7


def test_ntp_and_meap_resolve_to_the_same_run_but_for_the_policy_and_its_ratio(capsys):
    ntp, meap = resolved("ntp.yaml", capsys), resolved("meap.yaml", capsys)
    for config in (ntp, meap):
        config["data"]["init_args"].pop("masking")
        config["data"]["init_args"].pop("mask_ratio")
    assert ntp == meap
