"""FineTuneDataModule: reading, truncation, reports, bad input; init_from; tiny end-to-end fine-tunes."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from core.errors import ConfigError, DataError
from datamodules.finetune import FineTuneDataModule, encode
from datamodules.policies.finetune import MEAPSFT
from experiments.run import main
from lightning_modules import CausalLMModule
from tests.conftest import BOS, EOS, make_vocab
from tests.test_run import scalars


class DigitTokenizer:
    """Whitespace-separated integers are the token ids: exact ids in tests."""

    def __call__(self, texts, add_special_tokens=False, split_special_tokens=False):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


def fit(pairs, block_size, truncation):
    return encode(pairs, DigitTokenizer(), make_vocab(), "{prompt}", "{answer}", block_size, truncation)


def test_prompt_start_cuts_the_prompt_keeps_the_answer_and_counts():
    prepared = fit([("10 11 12 13 14 15", "30 31"), ("10", "30 31 32 33 34")], 6, "prompt_start")
    assert [ids.tolist() for ids in prepared.ids] == [[BOS, 14, 15, 30, 31, EOS]]
    assert prepared.answer_spans == [(3, 6)]
    assert prepared.events == {
        "prompts cut at their start": 1,
        "dropped: the answer alone is longer than data.block_size": 1,
    }
    assert prepared.summary().startswith("1 of 2 samples kept")


def test_end_truncation_cuts_the_answer_and_reports_a_prompt_that_fills_the_block():
    prepared = fit([("10 11 12", "30 31 32 33"), ("10 11 12 13", "30"), ("10", "30")], 6, "end")
    assert [ids.tolist() for ids in prepared.ids] == [[BOS, 10, 11, 12, 30, EOS], [BOS, 10, 30, EOS]]
    assert prepared.answer_spans == [(4, 5), (2, 4)]  # a cut answer's EOS carries no loss
    assert prepared.events == {
        "answers cut at their end (truncation=end)": 1,
        "dropped: the prompt fills data.block_size, no answer token left": 1,
    }


def test_drop_truncation_drops_overlong_samples():
    prepared = fit([("10 11 12", "30 31 32 33"), ("10", "30")], 6, "drop")
    assert len(prepared.ids) == 1 and sum(prepared.events.values()) == 1


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def datamodule(tmp_path, records, **kwargs):
    dm = FineTuneDataModule(
        data_path=write_jsonl(tmp_path / "train.jsonl", records),
        prompt_template="{prompt}",
        answer_template="{answer}",
        cache_dir=str(tmp_path / "cache"),
        **kwargs,
    )
    dm.tokenizer_source.__dict__["tokenizer"], dm.tokenizer_source.__dict__["vocab"] = DigitTokenizer(), make_vocab()
    return dm


def test_a_cached_tokenizer_is_found_without_building_the_text(tmp_path):
    args = dict(builtin_documents=40, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    first = FineTuneDataModule(**args)
    first.prepare_data()  # trains and caches the BPE
    again = FineTuneDataModule(**args)
    again._texts = lambda split: pytest.fail(f"the {split} text was built, but the tokenizer is cached")
    again.prepare_data()
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab() and len(again.tokenizer) == 300


def test_concatenated_copies_without_room_are_counted_and_warned(tmp_path):
    long_answer = " ".join(["30"] * 51)
    records = [{"prompt": "10 11", "answer": long_answer}] * 3 + [{"prompt": "10", "answer": "30"}] * 3
    dm = datamodule(tmp_path, records, masking=MEAPSFT(), block_size=100, val_fraction=0.34, batch_size=2)
    with pytest.warns(UserWarning, match="2 MEAP copies dropped: no room for the concatenated copy"):
        dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].size(1) <= 100 and not batch["masked"].any()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [{"prompt": "10", "answer": "30"}, {"prompt": "10", "response": "30"}],
            "train.jsonl line 2: no 'answer' field",
        ),
        (
            [{"prompt": "10", "answer": "30"}, {"prompt": "10", "answer": "  "}],
            "train.jsonl line 2: the answer (field 'answer') is empty",
        ),
        (['{"prompt": "10", "answer": '], "train.jsonl line 1: not a JSON object"),
    ],
)
def test_bad_samples_name_the_file_and_line(records, message, tmp_path):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        datamodule(tmp_path, records).pairs("train")


def test_bad_config_values_are_named(tiny_args, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config",
                "experiments/configs/sft_meap.yaml",
                *tiny_args,
                "--data.mask_ratio",
                "1.5",
                "--data.truncation",
                "middle",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.mask_ratio must be in [0, 1], got 1.5" in err and "data.truncation must be one of" in err
    assert not list((tmp_path / "runs").glob("*/version_*"))


def test_init_from_a_missing_folder_is_a_config_error():
    with pytest.raises(ConfigError, match="model.init_from: '/no/such/run' is neither a run dir"):
        CausalLMModule(
            vocab={"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            init_from="/no/such/run",
        )


@pytest.fixture
def pretrained(tiny_args, tmp_path):
    main(["--config", "experiments/configs/ntp.yaml", *tiny_args, "--trainer.max_steps", "2"])
    return tmp_path / "runs" / "ntp" / "version_0"


@pytest.mark.parametrize("config", ["sft_plain", "sft_meap", "sft_meap_reference"])
def test_tiny_fine_tune_of_a_tiny_pretrained_run(config, pretrained, tiny_args, tmp_path):
    cli = main(
        [
            "--config",
            f"experiments/configs/{config}.yaml",
            *tiny_args,
            "--data.block_size",
            "1024",
            "--model.init_args.init_from",
            str(pretrained),
        ]
    )
    run_dir = tmp_path / "runs" / config / "version_0"
    # no tokenizer_path given: the pre-trained run's tokenizer is the default, recorded in the config
    saved_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved_config["data"]["init_args"]["tokenizer_path"] == str(pretrained / "hf_model")
    assert (run_dir / "hf_model" / "model.safetensors").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["val/loss"] > 0
    share = max(scalars(run_dir)["mask/share"].values())
    assert (share > 0) == (config != "sft_plain")  # MEAP rows carry masks; plain SFT never
    # the fine-tune started from the pre-trained weights
    vocab = cli.datamodule.model_vocab
    start = CausalLMModule(
        vocab=vocab,
        block_size=1024,
        hidden_size=32,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=1024,
        init_from=str(pretrained),
    )
    saved = AutoModelForCausalLM.from_pretrained(pretrained / "hf_model", local_files_only=True)
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(start.model.state_dict()[name], tensor)
