import re
from collections import Counter

from datamodules.corpus import BuiltinCorpus


def test_same_seed_same_text_other_seed_other_text():
    assert BuiltinCorpus(3).documents(5) == BuiltinCorpus(3).documents(5)
    assert BuiltinCorpus(3).documents(5) != BuiltinCorpus(4).documents(5)


def test_train_and_validation_streams_differ():
    corpus = BuiltinCorpus(0)
    assert not set(corpus.documents(20, "train")) & set(corpus.documents(20, "validation"))


def test_sentences_end_in_punctuation_and_word_frequencies_are_zipfian():
    text = " ".join(BuiltinCorpus(0).documents(200))
    sentences = re.split(r"(?<=[.!?])\s+", text)
    assert all(s[-1] in ".!?" for s in sentences if s)
    counts = sorted(Counter(re.findall(r"[a-z]+", text.lower())).values(), reverse=True)
    # Zipf: the 10th most frequent word is several times rarer than the 1st, the 100th rarer still
    assert counts[0] > 3 * counts[9] > 3 * counts[99] > 0


def test_every_fact_is_stated_and_recalled_later_with_the_same_value():
    for doc in BuiltinCorpus(1).documents(30):
        facts = re.findall(r"The (\w+) of (\w+) is (\d+)\.", doc)
        recalls = re.findall(r"Recall: the (\w+) of (\w+) is (\d+)\.", doc)
        assert facts and sorted(facts) == sorted(recalls)
        for fact in facts:
            stated = doc.index("The {} of {} is {}.".format(*fact))
            assert doc.index("Recall: the {} of {} is {}.".format(*fact)) > stated
