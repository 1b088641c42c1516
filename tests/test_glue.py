"""GLUE suite: the readers on the real GLUE files, metrics by hand, and fine-tuning tiny models on a
task a classifier learns in a few steps (the label is whether a sentence says "good" or "bad")."""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForSequenceClassification

from core.errors import ConfigError, DataError
from evaluation import glue
from evaluation.model import LoadedModel, load_model

GLUE_DIR = Path(__file__).parents[1] / "../shared/data/glue"
FILLERS = ["the film was", "this book is", "our dinner seemed", "that idea sounds", "my day was", "the show is"]


def real_glue() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"real GLUE files not found at {GLUE_DIR}")
    return GLUE_DIR


def toy_sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Label 1 for "good: ...", 0 for "bad: ...", with varied fillers after the one telling word."""
    rng = random.Random(seed)
    labels = [i % 2 for i in range(count)]
    return [f"{'good' if y else 'bad'}: {rng.choice(FILLERS)} ." for y in labels], labels


def write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, row)) for row in [header, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def toy_glue(tmp_path_factory) -> Path:
    """A GLUE folder: `sst-2/` (single sentences, 0/1) and `RTE/` (pairs, the original GLUE string labels)."""
    root = tmp_path_factory.mktemp("glue")
    for split, count, seed in (("train", 64, 0), ("dev", 40, 1)):
        sentences, labels = toy_sentences(count, seed)
        write_tsv(root / "sst-2" / f"{split}.tsv", ["sentence", "label"], list(zip(sentences, labels)))
        names = ["not_entailment", "entailment"]  # entailment (0) when the hypothesis says "good"
        rows = [[i, "a plain premise .", s, names[y]] for i, (s, y) in enumerate(zip(sentences, labels))]
        write_tsv(root / "RTE" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"], rows)
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds contention on a busy machine (25x slower steps seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick(**overrides) -> glue.Options:
    settings = {"epochs": 6, "lr": 5e-3, "batch_size": 8, "accelerator": "cpu", "seeds": [0]}
    return glue.Options(**(settings | overrides))


# --- the real GLUE files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, split, count, labels",
    [
        ("RTE", "dev", 277, {0: 146, 1: 131}),
        ("RTE", "train", 2490, None),
        ("MRPC", "dev", 408, None),
        ("MRPC", "train", 3668, None),
        ("CoLA", "dev", 527 + 516, None),
        ("CoLA", "train", 8551, None),
        ("SST-2", "dev", 872, {0: 428, 1: 444}),
    ],
)
def test_real_files_are_read_whole(task, split, count, labels):
    examples = glue.read_split(str(real_glue()), glue.task_named(task), split)
    assert len(examples.texts) == len(examples.labels) == count
    assert set(examples.labels) == {0, 1}
    if labels is not None:
        assert Counter(examples.labels) == labels
    pair = task in ("RTE", "MRPC")
    assert all(len(texts) == (2 if pair else 1) and all(t.strip() for t in texts) for texts in examples.texts)


def test_mrpc_quotes_are_literal():
    """The BOM'd header is found and an unbalanced quote does not swallow the following lines."""
    examples = glue.read_split(str(real_glue()), glue.task_named("mrpc"), "dev")
    assert examples.labels[:2] == [1, 0]
    assert examples.texts[0][1] == '"The foodservice pie business does not fit our long-term growth strategy.'


def test_cola_dev_joins_in_and_out_of_domain():
    examples = glue.read_split(str(real_glue()), glue.task_named("cola"), "dev")
    assert examples.texts[0] == ("The sailors rode the breeze clear of the rocks.",)
    assert examples.texts[527] == ("Somebody just left - guess who.",)  # the first out-of-domain row


def test_missing_train_file_is_named():
    with pytest.raises(DataError, match=r"SST-2: no train split for task sst2 \(expected train.tsv\)"):
        glue.read_split(str(real_glue()), glue.task_named("sst2"), "train")


# --- task names and bad input ----------------------------------------------------------------------


def test_task_names_ignore_case_and_punctuation():
    assert glue.task_named("SST-2") is glue.task_named("sst2") is glue.task_named("Sst_2")
    with pytest.raises(DataError, match="unknown task 'qnli'"):
        glue.task_named("qnli")


def test_missing_column_names_the_file(tmp_path):
    path = write_tsv(tmp_path / "RTE" / "train.tsv", ["sentence1", "label"], [["a", 0]])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: no column 'sentence2'"):
        glue.read_split(str(tmp_path), glue.task_named("rte"), "train")


def test_short_row_and_bad_label_name_file_and_line(tmp_path):
    path = tmp_path / "CoLA" / "in_domain_train.tsv"
    path.parent.mkdir()
    path.write_text("gj04\t1\t\tFine.\ngj04\t0\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: 2 tab-separated fields, expected at least 4"):
        glue.read_split(str(tmp_path), glue.task_named("cola"), "train")
    path.write_text("gj04\t1\t\tFine.\ngj04\tmaybe\t\tHm.\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: label 'maybe' is not one of 0, 1"):
        glue.read_split(str(tmp_path), glue.task_named("cola"), "train")


def test_bad_options(tiny_mlm_dir, toy_glue):
    loaded = load_model(str(tiny_mlm_dir))
    with pytest.raises(ConfigError, match="exactly one of data_dir and hf_dataset"):
        glue.run(loaded, quick())
    with pytest.raises(ConfigError, match=r"glue.max_length must be in \[8, 256\]"):
        glue.run(loaded, quick(data_dir=str(toy_glue), max_length=512))
    with pytest.raises(DataError, match="unknown task 'mnli'"):
        glue.run(loaded, quick(data_dir=str(toy_glue), tasks=["sst2", "mnli"]))
    with pytest.raises(DataError, match=rf"{re.escape(str(toy_glue))}.*no folder for task cola"):
        glue.run(loaded, quick(data_dir=str(toy_glue), tasks=["cola"]))


def test_hf_dataset_source(tmp_path, monkeypatch):
    """A local `datasets` repo with one config per task (the nyu-mll/glue layout)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for split in ("train", "validation"):
        rows = [{"sentence1": f"p{i}", "sentence2": f"h{i}", "label": i % 2, "idx": i} for i in range(5)]
        (tmp_path / "repo" / "rte").mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / "rte" / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)))
    files = "".join(f"  - split: {s}\n    path: rte/{s}.jsonl\n" for s in ("train", "validation"))
    (tmp_path / "repo" / "README.md").write_text(f"---\nconfigs:\n- config_name: rte\n  data_files:\n{files}---\n")
    examples = glue.load_hf_split(str(tmp_path / "repo"), glue.task_named("rte"), "dev")
    assert examples.texts[3] == ("p3", "h3") and examples.labels == [0, 1, 0, 1, 0]
    with pytest.raises(DataError, match=r"config 'cola', split 'train'"):
        glue.load_hf_split(str(tmp_path / "repo"), glue.task_named("cola"), "train")


# --- encoding and metrics --------------------------------------------------------------------------


def test_longest_first_truncation():
    assert glue.longest_first([10, 3], 8) == [5, 3]
    assert glue.longest_first([6, 7], 8) == [4, 4]
    assert glue.longest_first([3, 2], 8) == [3, 2]


def test_encode_frames_like_pretraining(tiny_mlm_dir):
    loaded = load_model(str(tiny_mlm_dir))
    bos, eos = loaded.vocab.bos_id, loaded.vocab.eos_id
    first = len(loaded.tokenizer("good .", add_special_tokens=False)["input_ids"])
    examples = glue.Examples([("good .", "a much longer second text " * 5)], [1])
    (features,) = glue.encode(examples, loaded, max_length=24)
    ids = features["input_ids"]
    assert len(ids) == 24 and features["label"] == 1
    assert [i for i, t in enumerate(ids) if t in (bos, eos)] == [
        0,
        first + 1,
        first + 2,
        23,
    ]  # <bos> a <eos> <bos> b <eos>
    assert loaded.tokenizer.decode(ids[1 : first + 1]) == "good ."  # the short text whole, the long one cut


def test_encode_uses_the_tokenizers_own_template(tiny_mlm_dir):
    """A BERT-like tokenizer's pair template and segment ids, the latter only for a model that has them."""
    loaded = load_model(str(tiny_mlm_dir))
    tokenizer = loaded.tokenizer
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<cls> $A <sep>", pair="<cls> $A <sep> $B:1 <sep>:1", special_tokens=[("<cls>", cls), ("<sep>", sep)]
    )
    examples = glue.Examples([("good .", "x " * 30)], [0])
    (features,) = glue.encode(examples, loaded, max_length=12)
    assert "token_type_ids" not in features  # the tiny BERT has type_vocab_size 1
    assert len(features["input_ids"]) == 12 and features["input_ids"][0] == cls
    assert [i for i, t in enumerate(features["input_ids"]) if t == sep][-1] == 11
    loaded.model.config.type_vocab_size = 2
    (features,) = glue.encode(examples, loaded, max_length=12)
    first = features["input_ids"].index(sep) + 1
    assert features["token_type_ids"] == [0] * first + [1] * (12 - first)


def test_binary_scores_by_hand():
    predictions = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1])
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1])  # TP 3, FP 2, FN 1, TN 2
    scores = glue.binary_scores(predictions, labels)
    assert scores["acc"] == pytest.approx(5 / 8)
    assert scores["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert scores["mcc"] == pytest.approx((3 * 2 - 2 * 1) / (5 * 4 * 4 * 3) ** 0.5)


def test_summary_means_and_sample_std():
    tasks = [glue.task_named("mrpc"), glue.task_named("cola")]
    per_seed = {
        "mrpc": [{"acc": 0.8, "f1": 0.9, "mcc": 0.1}, {"acc": 0.6, "f1": 0.7, "mcc": 0.3}],
        "cola": [{"acc": 0.7, "f1": 0.8, "mcc": 0.2}, {"acc": 0.7, "f1": 0.8, "mcc": 0.4}],
    }
    metrics = glue.summarise(tasks, per_seed)
    assert list(metrics)[:2] == ["score", "score_std"]
    assert set(metrics) == {
        "score",
        "score_std",
        "mrpc/acc",
        "mrpc/acc_std",
        "mrpc/f1",
        "mrpc/f1_std",
        "cola/mcc",
        "cola/mcc_std",
    }
    assert metrics["mrpc/acc"] == pytest.approx(0.7) and metrics["mrpc/acc_std"] == pytest.approx(
        statistics.stdev([0.8, 0.6])
    )
    assert metrics["cola/mcc"] == pytest.approx(0.3) and metrics["cola/mcc_std"] == pytest.approx((2 * 0.1**2) ** 0.5)
    per_seed_score = [(0.85 + 0.2) / 2, (0.65 + 0.4) / 2]  # mean over tasks of (MRPC (acc+f1)/2, CoLA mcc)
    assert metrics["score"] == pytest.approx(statistics.fmean(per_seed_score))
    assert metrics["score_std"] == pytest.approx(statistics.stdev(per_seed_score))
    one_seed = glue.summarise(tasks, {name: runs[:1] for name, runs in per_seed.items()})
    assert one_seed["mrpc/f1_std"] == one_seed["score_std"] == 0.0


# --- fine-tuning -----------------------------------------------------------------------------------


def test_encoder_learns_the_toy_task_over_two_seeds(tiny_mlm_dir, toy_glue):
    options = quick(data_dir=str(toy_glue), tasks=["SST-2", "sst2"], seeds=[0, 1])  # one task, named twice
    result = glue.run(load_model(str(tiny_mlm_dir)), options)
    accuracies = result.details["per_seed"]["sst2"]["acc"]
    assert len(accuracies) == 2 and min(accuracies) >= 0.9  # chance is 0.5
    assert result.metrics["sst2/acc"] == pytest.approx(statistics.fmean(accuracies))
    assert result.metrics["sst2/acc_std"] == pytest.approx(statistics.stdev(accuracies))
    assert list(result.metrics) == ["score", "score_std", "sst2/acc", "sst2/acc_std"]
    assert result.metrics["score"] == result.metrics["sst2/acc"]
    assert result.details["examples"] == {"sst2": {"train": 64, "dev": 40}}
    assert "| sst2 | acc |" in result.table and "| 2 |" in result.table
    assert len(result.figures["scores"].axes[0].patches) == 1


def test_classifier_trains_with_dropout(tiny_mlm_dir):
    """from_pretrained returns a model in eval mode, and Lightning keeps the modes it finds."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_mlm_dir, num_labels=2)
    assert all(m.training for m in glue.Classifier(model, quick()).modules())


def test_decoder_in_training_learns_pairs(tiny_causal_dir, toy_glue):
    """A model with no hf_model folder yet (path None) is saved to a temporary one; RTE's string labels."""
    saved = load_model(str(tiny_causal_dir))
    loaded = LoadedModel(saved.model, saved.tokenizer, saved.vocab, "causal", path=None)
    result = glue.run(loaded, quick(data_dir=str(toy_glue), tasks=["rte"], max_train_examples=48, max_eval_examples=30))
    assert result.details["examples"] == {"rte": {"train": 48, "dev": 30}}
    assert result.metrics["rte/acc"] >= 0.9
