"""The policy contract: one home for the ratio, declared needs checked both ways before training,
fine-tuning's own protocol, and the renamed class path."""

import json
from types import SimpleNamespace

import pytest
import torch

import datamodules
from callbacks import AdaptiveMaskingCallback, EntropyMaskingCallback, MaskRatioSchedule
from callbacks.policy_driver import compatibility_errors
from core.errors import ConfigError
from datamodules import (
    MEAPSFT,
    AdaptiveMLMMask,
    EntropyPositionMask,
    FineTuneDataModule,
    FineTunePolicy,
    MaskingPolicy,
    NoMask,
    PenultimateTokenMask,
    PlainSFT,
    Policy,
    PretrainingDataModule,
    RandomMLMMask,
    SelectionPolicy,
)
from experiments.run import main
from tests.conftest import random_ids

# ---- one home for the ratio ------------------------------------------------------------------


def test_the_datamodule_hands_its_mask_ratio_to_the_policy_or_the_policys_default():
    assert PretrainingDataModule(masking=RandomMLMMask(), mask_ratio=0.3).policy.ratio == pytest.approx(0.3)
    assert PretrainingDataModule(masking=RandomMLMMask()).policy.ratio == pytest.approx(0.15)
    assert FineTuneDataModule(masking=MEAPSFT()).policy.ratio == pytest.approx(0.10)
    assert FineTuneDataModule(masking=MEAPSFT(), mask_ratio=0.2).policy.ratio == pytest.approx(0.2)


def test_a_ratio_read_before_the_datamodule_set_it_is_an_error_not_a_silent_default():
    class ReadsRatioTooEarly(SelectionPolicy):
        def __init__(self) -> None:
            super().__init__("mlm")
            self.budget = self.ratio  # the mistake the contract guards against

        def select(self, block, generator):
            return torch.zeros_like(block.input_ids, dtype=torch.bool)

    with pytest.raises(RuntimeError, match=r"ReadsRatioTooEarly.ratio is read before the datamodule set it"):
        ReadsRatioTooEarly()
    assert repr(RandomMLMMask()) == "RandomMLMMask(ratio=unset)"


@pytest.mark.parametrize("policy", [PenultimateTokenMask(), NoMask()], ids=lambda p: type(p).__name__)
def test_a_mask_ratio_for_a_policy_without_one_is_a_config_error(policy):
    name = type(policy).__name__
    message = (
        f"data.mask_ratio=0.15 is set, but data.masking={name} has no ratio (its budget is set by the text): "
        "remove data.mask_ratio"
    )
    with pytest.raises(ConfigError) as err:
        PretrainingDataModule(masking=policy, mask_ratio=0.15)
    assert str(err.value) == message
    assert not PretrainingDataModule(masking=policy).policy.uses_ratio
    with pytest.raises(ConfigError, match="data.mask_ratio=0.1 is set, but data.masking=PlainSFT has no ratio"):
        FineTuneDataModule(masking=PlainSFT(), mask_ratio=0.1)


def test_the_schedule_moves_the_ratio_the_collate_reads(vocab):
    dm = PretrainingDataModule(masking=RandomMLMMask(), mask_ratio=0.4)
    schedule = MaskRatioSchedule(start=0.4, end=0.1, steps=10)
    trainer = SimpleNamespace(datamodule=dm, global_step=5, estimated_stepping_batches=10)
    schedule.setup(trainer, None, "fit")
    schedule.on_train_batch_start(trainer, None)
    assert dm.policy.ratio == pytest.approx(0.25)
    ids = random_ids(64, 128, vocab)
    masked = dm.policy(datamodules.TokenBlock.from_ids(ids, vocab), torch.Generator().manual_seed(0))["masked"]
    assert 0.23 < masked.float().mean().item() < 0.27


# ---- declared needs, checked both ways -------------------------------------------------------


MLM = SimpleNamespace(objective="mlm")


def errors(masking, *callbacks, model=MLM, data=PretrainingDataModule):
    return compatibility_errors(model, data(masking=masking), callbacks)


def test_a_policy_without_the_callback_it_needs_is_named():
    assert errors(EntropyPositionMask()) == [
        "data.masking=EntropyPositionMask needs callbacks.EntropyMaskingCallback in trainer.callbacks "
        "(it chooses the masked positions with the model)"
    ]
    assert errors(AdaptiveMLMMask()) == [
        "data.masking=AdaptiveMLMMask needs callbacks.AdaptiveMaskingCallback in trainer.callbacks"
    ]
    assert errors(EntropyPositionMask(), EntropyMaskingCallback()) == []
    assert errors(AdaptiveMLMMask(), AdaptiveMaskingCallback(), MaskRatioSchedule()) == []


def test_a_callback_without_a_policy_it_can_drive_is_named():
    assert errors(RandomMLMMask(), EntropyMaskingCallback()) == [
        "EntropyMaskingCallback needs data.masking=EntropyPositionMask, got RandomMLMMask"
    ]
    assert errors(PenultimateTokenMask(), MaskRatioSchedule()) == [
        "MaskRatioSchedule changes the mask ratio, but data.masking=PenultimateTokenMask has none "
        "(its budget is set by the text)"
    ]
    causal = SimpleNamespace(objective="causal")
    assert errors(MEAPSFT(), MaskRatioSchedule(), model=causal, data=FineTuneDataModule) == []
    assert errors(RandomMLMMask(), model=causal) == [
        "data.masking=RandomMLMMask builds 'mlm' batches but model=SimpleNamespace trains the 'causal' objective"
    ]


def test_the_entry_point_refuses_both_pairings_before_training(tiny_args, capsys, tmp_path):
    faults = {
        "mlm_random": (
            ["--data.init_args.masking", "datamodules.EntropyPositionMask"],
            "error: data.masking=EntropyPositionMask needs callbacks.EntropyMaskingCallback in trainer.callbacks",
        ),
        "penultimate": (
            ["--trainer.callbacks+=callbacks.MaskRatioSchedule"],
            "error: MaskRatioSchedule changes the mask ratio, but data.masking=PenultimateTokenMask has none",
        ),
    }
    for config, (extra, message) in faults.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", f"experiments/configs/{config}.yaml", *tiny_args, *extra])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert not list((tmp_path / "runs").glob("*/version_*"))  # nothing trained, no run dir left behind


# ---- fine-tuning's own protocol --------------------------------------------------------------


def test_fine_tuning_policies_share_the_declarations_not_the_pretraining_protocol():
    assert issubclass(FineTunePolicy, Policy) and issubclass(MaskingPolicy, Policy)
    assert not issubclass(FineTunePolicy, MaskingPolicy) and not issubclass(MaskingPolicy, FineTunePolicy)
    assert not issubclass(FineTuneDataModule, PretrainingDataModule)
    with pytest.raises(ConfigError, match="data.masking=PlainSFT is not a MaskingPolicy: it belongs with "):
        PretrainingDataModule(masking=PlainSFT())
    with pytest.raises(ConfigError, match="data.masking=RandomMLMMask is not a FineTunePolicy: it belongs with "):
        FineTuneDataModule(masking=RandomMLMMask())


def test_a_renamed_class_path_names_the_new_one(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"^MEAPFineTuneCollate was renamed: use datamodules.MEAPSFT"):
        datamodules.MEAPFineTuneCollate  # noqa: B018
    config = tmp_path / "old.yaml"
    old = {"class_path": "datamodules.MEAPFineTuneCollate", "init_args": {"ratio": 0.1}}
    config.write_text(
        json.dumps({"data": {"class_path": "datamodules.FineTuneDataModule", "init_args": {"masking": old}}})
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--print_config"])
    assert exit_info.value.code == 2
    assert "MEAPFineTuneCollate was renamed: use datamodules.MEAPSFT" in capsys.readouterr().err
