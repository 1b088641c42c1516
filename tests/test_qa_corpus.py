"""The built-in QA generator: deterministic, disjoint splits, answers on both sides of 50 tokens."""

import re

import pytest

from datamodules.qa_corpus import QACorpus


def test_same_seed_same_examples_and_splits_differ():
    assert QACorpus(3).examples(20) == QACorpus(3).examples(20)
    train, test = QACorpus(3).examples(50), QACorpus(3).examples(50, "test")
    assert not {e.prompt for e in train} & {e.prompt for e in test}


def test_key_value_answer_is_the_value_of_the_gold_fact_at_its_position():
    for example in [e for e in QACorpus(0).examples(40) if e.kind == "kv"]:
        attribute, name = re.search(r"Question: what is the (\w+) of (\w+)\?$", example.prompt).groups()
        facts = re.findall(rf"The {attribute} of (\w+) is (\d+)\.", example.prompt)
        index = [n for n, _ in facts].index(name)
        assert facts[index][1] == example.answer
        assert example.gold_position == pytest.approx(index / (len(facts) - 1))


def test_record_answers_are_copied_from_the_context_and_straddle_50_tokens():
    records = [e for e in QACorpus(0).examples(200) if e.kind == "record"]
    assert all(e.answer in e.prompt and 0 <= e.gold_position <= 1 for e in records)
    # a fact ("The code of Velora is 4812.") is at least 7 tokens for any tokenizer that splits
    # words and punctuation, so 8 facts are > 50 tokens; 2 facts are < 20
    facts = [e.answer.count(". ") + 1 for e in records]
    assert min(facts) == 2 and max(facts) == 12 and sum(f >= 8 for f in facts) > 10


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_facts"):
        QACorpus(0, max_facts=1)
