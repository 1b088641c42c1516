"""The recall corpus (MQAR) and its suite: answers bound to their keys, options, seeds, [MASK]
never in the data, bad input in one line; oracle / random-pair / constant scores; the distance
split on a hand-built case; decoders and encoders; a tiny recall study end to end."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import ConfigError, DataError
from datamodules.finetune import FineTuneDataModule
from datamodules.policies.finetune import MEAPSFT
from datamodules.pretraining import PretrainingDataModule
from datamodules.recall import RecallConfig, generate, recall_tokenizer
from datamodules.tokenizer import vocab_of
from evaluation import recall
from evaluation.model import LoadedModel
from evaluation.suites import metric_names, name_matches, parse_suites

NTP, MEAP = "experiments/configs/ntp.yaml", "experiments/configs/meap.yaml"
BASE = RecallConfig(pairs=4, queries=6, keys=16, values=16)  # 21 tokens with <bos>


def bound_values(ids: np.ndarray, value_position: np.ndarray) -> np.ndarray:
    """[N, Q] the value after the first occurrence of each query's key: what an oracle answers."""
    keys = np.take_along_axis(ids, value_position - 1, axis=1)  # [N, Q]
    first = (ids[:, None, :] == keys[:, :, None]).argmax(-1)  # [N, Q]
    return np.take_along_axis(ids, first + 1, axis=1)


def loaded_for(
    config: RecallConfig, block_size: int, model: nn.Module, objective: str = "causal", data_class: str = ""
) -> LoadedModel:
    tokenizer = recall_tokenizer(config)
    data = {"builtin_variant": "recall", "recall": vars(config), "block_size": block_size, "seed": 0}
    run_config = {"data": {"class_path": data_class, "init_args": data}}
    return LoadedModel(model.eval(), tokenizer, vocab_of(tokenizer), objective, run_config=run_config)


class FakeLM(nn.Module):
    """Logits from a rule over the whole input (so a test can cheat or be blind on purpose)."""

    def __init__(self, rule, vocab: int, context: int = 64) -> None:
        super().__init__()
        self.rule, self.vocab = rule, vocab
        self.weight = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.config = type("Config", (), {"model_type": "fake", "max_position_embeddings": context})()

    def forward(self, input_ids: torch.Tensor, attention_mask=None):
        predicted = self.rule(input_ids)  # [B, L]
        return type("Output", (), {"logits": nn.functional.one_hot(predicted, self.vocab).float()})()


def answer_from_context(ids: torch.Tensor) -> torch.Tensor:
    """At every position, the value bound to the token before it: an encoder that reads the pairs."""
    previous = torch.roll(ids, 1, 1)
    first = (ids[:, None, :] == previous[:, :, None]).float().argmax(-1)  # [B, L] first occurrence of that key
    return ids.gather(1, (first + 1).clamp(max=ids.shape[1] - 1))


# ---- the corpus -----------------------------------------------------------------------------


@pytest.mark.parametrize("filler", ["none", "uniform", "zipf"])
def test_every_query_is_a_context_key_followed_by_the_value_bound_to_it(filler):
    config = replace(BASE, filler=filler, distance=3 if filler != "none" else 0)
    length = 21 if filler == "none" else 40
    data = generate(config, length, 200, seed=1)
    ids = data.ids
    assert ids.shape == (200, length) and (ids[:, 0] == 1).all()
    assert (np.take_along_axis(ids, data.value_position, 1) == data.answer).all()
    assert (bound_values(ids, data.value_position) == data.answer).all()
    is_key = (ids >= config.key_offset) & (ids < config.value_offset)
    assert (is_key.sum(1) == config.pairs + config.queries).all()
    pair_keys = np.sort(np.where(is_key, ids, -1), axis=1)[:, -(config.pairs + config.queries) :]
    assert all(len(set(row)) == config.pairs for row in pair_keys)  # every query repeats one of the P keys
    assert (data.distance >= 1 + config.distance).all()
    assert data.first.sum(1).max() <= config.pairs and data.first[:, 0].all()


def test_options_change_the_data_and_the_same_seed_gives_the_same_data():
    data = generate(BASE, 21, 100, seed=0)
    assert (generate(BASE, 21, 100, seed=0).ids == data.ids).all()
    assert (generate(BASE, 21, 100, seed=1).ids != data.ids).any()
    assert (generate(BASE, 21, 100, seed=0, split="validation").ids != data.ids).any()
    few = replace(BASE, keys=5, values=6)
    small = generate(few, 21, 100, 0).ids
    assert small[:, 1:].max() < few.filler_offset and set(np.unique(small[:, 1::2])) <= set(range(7, 12))
    assert generate(replace(BASE, pairs=2, queries=8), 21, 10, 0).first.sum(1).max() <= 2
    uniform = generate(replace(BASE, filler="uniform"), 200, 200, 0).ids
    zipf = generate(replace(BASE, filler="zipf"), 200, 200, 0).ids
    counts = lambda ids: np.bincount(ids.ravel() - BASE.filler_offset + 100, minlength=200)[100:]
    assert counts(zipf)[0] > 5 * counts(uniform)[0] and counts(zipf)[0] == counts(zipf).max()
    far = generate(replace(BASE, filler="uniform", distance=100), 200, 50, 0)
    assert far.distance.min() > 100 and generate(replace(BASE, filler="uniform"), 200, 50, 0).distance.min() < 100


def test_the_datamodule_serves_recall_blocks_with_its_own_vocabulary_and_never_mask(tmp_path):
    dm = PretrainingDataModule(
        builtin_variant="recall", recall=BASE, block_size=21, builtin_documents=300, cache_dir=str(tmp_path)
    )
    dm.setup()
    assert dm.tokenizer.convert_ids_to_tokens([0, 4, 7, 23, 39]) == ["<pad>", "<mask>", "k0", "v0", "f0"]
    assert dm.vocab.size == len(BASE.tokens()) and dm.vocab.mask_id == 4
    assert dm.train_blocks.shape == (300, 21) and len(dm.val_batches["input_ids"]) == 15
    assert not (np.asarray(dm.train_blocks) == dm.vocab.mask_id).any()
    assert not (dm.val_batches["input_ids"] == dm.vocab.mask_id).any()
    assert (np.asarray(dm.train_blocks) == generate(BASE, 21, 300, 0).ids).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recall": replace(BASE, pairs=20, values=32)}, r"^data.recall.pairs=20 is more than data.recall.keys=16"),
        ({"recall": replace(BASE, values=3)}, r"^data.recall.pairs=4 is more than data.recall.values=3"),
        ({"block_size": 20}, r"^data.block_size=20 is too short for <bos>, 4 pairs and 6 queries \(21 tokens"),
        (
            {"block_size": 30, "recall": replace(BASE, filler="uniform", distance=10)},
            r"^data.recall.distance=10 cannot be laid out: data.block_size=30 leaves 9 filler tokens",
        ),
        ({"block_size": 30}, r"^data.recall.filler='none' leaves 9 of data.block_size=30 tokens empty"),
        ({"recall": replace(BASE, filler="gauss")}, r"^data.recall.filler must be one of"),
        ({"hf_dataset": "wikitext"}, r"^data.builtin_variant='recall' is built in: unset data.data_path"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        PretrainingDataModule(**{"builtin_variant": "recall", "recall": BASE, "block_size": 21, **kwargs})
    assert "\n" not in str(err.value) and len(err.value.errors) == 1


# ---- recall-formatted fine-tuning samples --------------------------------------------------


def test_fine_tuning_samples_are_recall_sequences_with_the_queries_as_the_answer(tmp_path):
    dm = FineTuneDataModule(
        builtin_variant="recall", recall=BASE, block_size=44, builtin_documents=40, cache_dir=str(tmp_path)
    )
    dm.setup()
    train = dm.prepared["train"]
    expected = generate(BASE, 21, 40, 0, bos_id=dm.vocab.bos_id).ids  # [40, 21] the same stream as pre-training
    assert (np.stack(train.ids)[:, :-1] == expected).all() and {int(ids[-1]) for ids in train.ids} == {dm.vocab.eos_id}
    assert set(train.answer_spans) == {(9, 22)}  # after <bos> and 4 pairs: 6 queries and EOS
    assert len(dm.prepared["validation"].ids) == 8 and dm.prompt_template == "{prompt}"
    assert dm.tokenizer.unk_token_id not in np.concatenate(train.ids)
    batch = next(iter(dm.train_dataloader()))
    labelled = batch["labels"] != -100
    assert labelled.sum(1).tolist() == [13] * 16 and labelled[:, 9:22].all()  # plain SFT: answer and EOS only


def test_meap_fine_tuning_copies_recall_samples_whose_answer_is_long_enough(tmp_path):
    policy = MEAPSFT(min_answer_tokens=11)  # the 12-token answers qualify (the rule is strict: > 11)
    dm = FineTuneDataModule(
        policy, builtin_variant="recall", recall=BASE, block_size=44, builtin_documents=16, cache_dir=str(tmp_path)
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (16, 44) and (batch["input_ids"][:, 22] == dm.vocab.bos_id).all()
    assert (batch["masked"].sum(1) == 2).all()  # floor(0.10 x 20 regular tokens of the copy)


def test_fine_tuning_on_recall_samples_refuses_another_vocabulary(tmp_path):
    other = tmp_path / "other"
    recall_tokenizer(replace(BASE, keys=20)).save_pretrained(other)  # a recall run with other key counts
    dm = FineTuneDataModule(builtin_variant="recall", recall=BASE, block_size=44, tokenizer_path=str(other))
    with pytest.raises(DataError, match=r"^data.builtin_variant='recall': tokenizer .* is not the recall vocabulary"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recall": replace(BASE, distance=3)}, r"^data.recall.distance=3: fine-tuning samples hold no filler"),
        ({"block_size": 21}, r"^data.block_size=21 is shorter than a recall sample \(22 tokens"),
        ({"recall": replace(BASE, values=3)}, r"^data.recall.pairs=4 is more than data.recall.values=3"),
        ({"builtin_variant": "mqar"}, r"^data.builtin_variant must be one of qa, recall; got 'mqar'"),
    ],
)
def test_bad_fine_tuning_input_is_one_line_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        FineTuneDataModule(**{"builtin_variant": "recall", "recall": BASE, "block_size": 44, **kwargs})
    assert "\n" not in str(err.value) and len(err.value.errors) == 1


# ---- the suite ------------------------------------------------------------------------------

VOCAB = len(BASE.tokens())
OPTIONS = recall.Options(sequences=256, lengths=[21, 40])


def test_recall_is_a_suite():
    assert parse_suites("recall") == ["recall"]


def test_an_oracle_scores_1_a_random_pair_1_over_pairs_and_a_constant_1_over_values():
    loaded = loaded_for(BASE, 21, FakeLM(lambda ids: ids, VOCAB))
    oracle = lambda ids, slots: torch.from_numpy(bound_values(ids.numpy(), slots.numpy()))
    perfect = recall.run(loaded, OPTIONS, oracle)
    assert perfect.metrics["acc"] == perfect.metrics["acc_first"] == perfect.metrics["acc_repeat"] == 1.0
    assert perfect.metrics["acc_length_40"] == 1.0 and np.array(perfect.details["accuracy_by_pair_and_length"]).min()
    templates = metric_names("recall", OPTIONS, "causal")  # what a study's metric check accepts
    assert all(any(name_matches(t, name) for t in templates) for name in perfect.metrics)
    rng = torch.Generator().manual_seed(0)
    random_pair = lambda ids, slots: ids[:, 2:9:2].gather(1, torch.randint(0, 4, slots.shape, generator=rng))
    guessing = recall.run(loaded, OPTIONS, random_pair).metrics
    assert guessing["chance"] == perfect.metrics["chance"] == 1 / BASE.pairs  # the level the suite reports
    assert abs(guessing["acc"] - guessing["chance"]) < 0.03
    constant = lambda ids, slots: torch.full_like(slots, BASE.value_offset)
    assert abs(recall.run(loaded, OPTIONS, constant).metrics["acc"] - 1 / BASE.values) < 0.02


def test_distance_split_on_a_hand_built_case():
    distance = np.array([[1, 2, 3, 5], [9, 8, 3, 1]])
    correct = np.array([[True, False, True, True], [False, True, True, False]])
    assert recall.distance_buckets(distance, correct) == {"1_1": 0.5, "2_3": 2 / 3, "4_7": 1.0, "8_15": 0.5}
    # <bos> k v k v | queries at 5, 7, 9: distance = query key position - its pair's value position
    data = generate(RecallConfig(pairs=2, queries=3, keys=2, values=2), 11, 20, 0)
    assert (data.distance == np.array([5, 7, 9]) - (2 + 2 * data.pair)).all()


def test_a_decoder_answers_before_the_slot_and_an_encoder_with_the_slot_masked():
    future = lambda ids: torch.cat([ids[:, 1:], ids[:, :1]], 1)  # cheats: the next token is the answer
    assert recall.run(loaded_for(BASE, 21, FakeLM(future, VOCAB)), OPTIONS).metrics["acc"] == 1.0
    copy = lambda ids: ids  # an encoder that copies its input sees [MASK] in every slot
    blind = recall.run(loaded_for(BASE, 21, FakeLM(copy, VOCAB), "mlm"), OPTIONS)
    assert blind.metrics["acc"] == 0.0
    reader = recall.run(loaded_for(BASE, 21, FakeLM(answer_from_context, VOCAB), "mlm"), OPTIONS)
    assert reader.metrics["acc"] == 1.0  # the pairs stay visible: only the queries' value slots are masked


def test_a_real_decoder_runs_and_a_model_of_another_corpus_is_refused():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    loaded = loaded_for(BASE, 21, LlamaForCausalLM(config))
    result = recall.run(loaded, recall.Options(sequences=8))
    assert 0 <= result.metrics["acc"] <= 1 and result.details["lengths"] == [21, 35, 50, 64]
    assert set(result.figures) == {"heatmap"}
    loaded.run_config["data"]["init_args"]["builtin_variant"] = "default"
    with pytest.raises(ConfigError, match="recall: the model was not trained on the recall corpus"):
        recall.run(loaded, recall.Options(sequences=8))
    with pytest.raises(ConfigError, match=r"recall.lengths \[65\] exceed the model's context of 64"):
        recall.run(loaded_for(BASE, 21, LlamaForCausalLM(config)), recall.Options(lengths=[65]))


def test_a_model_whose_tokenizer_is_not_its_runs_recall_vocabulary_is_refused():
    loaded = loaded_for(BASE, 21, FakeLM(lambda ids: ids, VOCAB))
    loaded.run_config["data"]["init_args"]["recall"] = vars(replace(BASE, values=20))
    with pytest.raises(
        ConfigError, match="recall: the model's tokenizer is not the vocabulary of its run's data.recall"
    ):
        recall.run(loaded, recall.Options(sequences=8))


def test_a_fine_tuned_model_is_scored_on_sequences_without_filler():
    """A fine-tuning run's block_size is a row limit, not the sequence length: its samples are <bos>,
    pairs and queries, so the suite scores that layout (at block_size 64 it would ask for filler)."""
    future = lambda ids: torch.cat([ids[:, 1:], ids[:, :1]], 1)
    loaded = loaded_for(BASE, 64, FakeLM(future, VOCAB), data_class="datamodules.FineTuneDataModule")
    result = recall.run(loaded, recall.Options(sequences=8))
    assert result.metrics["acc"] == 1.0 and result.details["lengths"][0] == 21


def test_tiny_recall_study_end_to_end(tmp_path):
    """2 arms x 2 seeds on the recall corpus, evaluated by the recall suite."""
    from experiments.study import main

    study = {
        "name": "tiny_recall",
        "question": "Does MEAP recall better than NTP?",
        "baseline": "ntp",
        "seeds": 2,
        "args": [
            "--trainer.callbacks",
            None,
            "--trainer.max_steps",
            4,
            "--trainer.val_check_interval",
            4,
            "--data.init_args.builtin_variant",
            "recall",
            "--data.init_args.block_size",
            21,
            "--data.init_args.recall.pairs",
            4,
            "--data.init_args.recall.queries",
            6,
            "--data.init_args.builtin_documents",
            64,
            "--data.init_args.batch_size",
            4,
            "--model.init_args.hidden_size",
            16,
            "--model.init_args.num_layers",
            1,
            "--model.init_args.num_heads",
            2,
            "--model.init_args.num_kv_heads",
            2,
            "--model.init_args.max_position_embeddings",
            32,
            "--data.cache_dir",
            str(tmp_path / "cache"),
        ],
        "arms": {
            "ntp": {"config": "experiments/configs/ntp.yaml"},
            "meap": {"config": "experiments/configs/meap.yaml"},
        },
        "evaluate": {"suites": ["recall"], "args": ["--recall.sequences", 8]},
        "metrics": {"eval/recall/acc": "higher", "eval/recall/acc_first": "higher"},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    folder = main(["--config", str(path), "--parallel", "2", "--studies_dir", str(tmp_path / "studies")])
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert sorted((r["arm"], r["status"]) for r in rows) == [("meap", "ok")] * 2 + [("ntp", "ok")] * 2
    assert all(0 <= float(r["eval/recall/acc"]) <= 1 for r in rows)
    assert "eval/recall/acc" in (folder / "report.md").read_text()
