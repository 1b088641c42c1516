"""The built-in corpus' retrieval-dense variant: what it holds, and that it speaks the retrieval suite's forms."""

import re
from collections import Counter

import numpy as np
import pytest

from core.errors import ConfigError
from datamodules.corpus import BuiltinCorpus
from datamodules.pretraining import PretrainingDataModule
from evaluation.retrieval import Example

FACT = r"The (\w+) of (\w+) is (\d+)\."


def test_default_variant_is_the_unchanged_corpus():
    assert BuiltinCorpus(2).documents(4, "validation", "default") == BuiltinCorpus(2).documents(4, "validation")


def test_unknown_variant_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="data.builtin_variant: unknown variant 'dense'"):
        BuiltinCorpus(0).documents(1, variant="dense")
    with pytest.raises(ConfigError, match="data.builtin_variant must be one of .*got 'dense'"):
        PretrainingDataModule(builtin_variant="dense")


def test_recall_document_recalls_each_fact_once_after_the_next_fact_when_distance_is_one():
    corpus = BuiltinCorpus(0)
    rng = np.random.default_rng(5)
    for _ in range(20):
        sentences = re.split(r"(?<=[.!?]) ", corpus.recall_document(rng, facts=(3, 6), distance=1))
        facts = [i for i, s in enumerate(sentences) if re.fullmatch(FACT, s)]
        names = [re.fullmatch(FACT, sentences[i]).group(2) for i in facts]
        assert len(set(names)) == len(names) >= 3
        recalls = [s for s in sentences if s.startswith("Recall:")]
        assert sorted(recalls) == sorted(f"Recall: t{sentences[i][1:]}" for i in facts)
        # distance 1: fact k is recalled right after fact k+1 is stated; the last fact at the end
        for k, i in enumerate(facts[:-1]):
            assert sentences[facts[k + 1] + 1] == f"Recall: t{sentences[i][1:]}"
        assert sentences[-1] == f"Recall: t{sentences[facts[-1]][1:]}"


def test_kv_and_qa_documents_are_the_retrieval_prompts_followed_by_their_answer():
    corpus = BuiltinCorpus(0)
    rng = np.random.default_rng(1)
    for _ in range(10):
        doc = corpus.kv_document(rng)
        pairs = re.findall(r'"(\w+)": "(\d+)"', doc)
        key = re.search(r'value of "(\w+)"', doc).group(1)
        gold = [name for name, _ in pairs].index(key)
        records = [f'"{name}": "{value}"' for name, value in pairs]
        example = Example(records, gold, f'"{key}"', [pairs[gold][1]], "kv")
        assert doc == f"{example.prompt(gold)}\nAnswer: {pairs[gold][1]}"

        doc = corpus.qa_document(rng)
        documents = re.findall(r"Document \[\d+\] (.*)", doc)
        facts = [re.search(FACT, d).groups() for d in documents]
        attribute, name = re.search(r"Question: what is the (\w+) of (\w+)\?", doc).groups()
        gold = [n for _, n, _ in facts].index(name)
        assert {a for a, _, _ in facts} == {attribute} and 2 <= len(documents) <= 4
        example = Example(documents, gold, f"what is the {attribute} of {name}", [facts[gold][2]], "qa")
        assert doc == f"{example.prompt(gold)}\nAnswer: {facts[gold][2]}"


def test_retrieval_dense_mixes_the_three_forms_and_differs_by_split_and_in_the_cache_key():
    docs = BuiltinCorpus(0).documents(300, "train", "retrieval_dense")
    kinds = Counter("kv" if d.startswith("JSON") else "qa" if d.startswith("Document") else "recall" for d in docs)
    assert set(kinds) == {"kv", "qa", "recall"} and min(kinds.values()) > 70
    assert not set(docs[:50]) & set(BuiltinCorpus(0).documents(50, "validation", "retrieval_dense"))
    dense = PretrainingDataModule(builtin_variant="retrieval_dense", builtin_documents=10)
    assert dense.source_key != PretrainingDataModule(builtin_documents=10).source_key
    assert dense._texts("train")["text"] == BuiltinCorpus(0).documents(10, "train", "retrieval_dense")
