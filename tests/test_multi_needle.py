"""Multi-needle reasoning: needles land where asked, only the needles decide the answer, an oracle
scores 1 and a model blind to the prompt scores chance."""

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from evaluation import multi_needle
from evaluation.model import load_model
from evaluation.needle import insert_needles
from evaluation.suites import metric_names, name_matches
from tests.conftest import FULL_STOP

SMALL = multi_needle.Options(lengths=[170, 210], needles=[2, 3], samples=2)


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    return load_model(str(tiny_causal_dir))


def solve(text: str) -> str:
    """The answer worked out from the needle sentences of a prompt alone."""
    asked = re.search(r"Recall: the eldest ancestor of (\w+) is$", text)
    if asked:
        parent = {child: p for p, child in re.findall(r"(\w+) is the parent of (\w+)\.", text)}
        name = asked[1]
        while name in parent:
            name = parent[name]
        return name
    attribute, names = re.search(r"Recall: the (\w+)s of (.+) are$", text).groups()
    value = dict(re.findall(rf"The {attribute} of (\w+) is (\d+)\.", text))
    return multi_needle.values_answer([value[n] for n in re.split(r", | and ", names)])


def oracle(loaded):
    """Scores 0 for the candidate the needles imply, -5 for every other."""

    def score(prompts, targets):
        texts = loaded.tokenizer.batch_decode(prompts, skip_special_tokens=True)
        answers = loaded.tokenizer.batch_decode(targets, skip_special_tokens=True)
        return torch.tensor([0.0 if a.strip() == solve(t) else -5.0 for t, a in zip(texts, answers)])

    return score


def test_needles_go_to_the_nearest_sentence_boundary_in_order():
    window = [20, 21, FULL_STOP, 22, 23, 24, FULL_STOP, 25, 26, 27]  # boundaries 0, 3, 7
    is_end = np.array(window) == FULL_STOP
    ids, cuts = insert_needles(window, is_end, [[91], [92, 92], [93]], [0.9, 0.0, 0.35])
    assert cuts == [7, 0, 3]
    assert ids == [92, 92, 20, 21, FULL_STOP, 93, 22, 23, 24, FULL_STOP, 91, 25, 26, 27]
    same, _ = insert_needles(window, is_end, [[91], [92]], [0.3, 0.3])  # one boundary: the given order
    assert same == [20, 21, FULL_STOP, 91, 92, 22, 23, 24, FULL_STOP, 25, 26, 27]


def test_prompts_hold_every_needle_at_its_depth_and_candidates_are_equally_long(causal):
    options = multi_needle.Options(lengths=[200], needles=[3], depths=[0.0, 0.5, 1.0], samples=3, shuffle=False)
    cases = multi_needle.build_cases(causal, options)
    assert [c.task for c in cases] == ["chain"] * 3 + ["values"] * 3
    for case in cases:
        assert len(case.ids) == case.length == 200 and len(case.candidates) == 3
        text = causal.tokenizer.decode(case.ids, skip_special_tokens=True)
        assert solve(text) == case.candidates[0] and text.endswith(("is", "are"))
        assert len(set(case.candidates)) == 3
        sizes = {len(ids) for ids in causal.tokenizer([" " + c for c in case.candidates])["input_ids"]}
        assert len(sizes) == 1  # no candidate is favoured by its length
        assert case.depths[0] == 0 < case.depths[1] <= case.depths[2] and case.depths[2] > 0.5
    chain = causal.tokenizer.decode(cases[0].ids, skip_special_tokens=True)
    names = [m for m, _ in re.findall(r"(\w+) is the parent of (\w+)\.", chain)]
    assert names == cases[0].candidates  # shuffle=False: the chain in reading order


def test_the_needles_alone_decide_the_answer(causal):
    """The haystack names nobody of the needles, and the needles and the question alone give the answer."""
    for case in multi_needle.build_cases(causal, SMALL):
        text = causal.tokenizer.decode(case.ids, skip_special_tokens=True)
        assert all(text.count(fact) == 1 for fact in case.facts)
        question = text[text.rindex("Recall:") :]
        haystack = text[: text.rindex("Recall:")]
        for fact in case.facts:
            haystack = haystack.replace(fact, "")
        assert not set(re.findall(r"\w+", haystack)) & set(case.names)
        assert solve(" ".join(case.facts) + "\n" + question) == case.candidates[0]


def test_an_oracle_scores_1_and_a_model_blind_to_the_prompt_scores_chance(causal):
    perfect = multi_needle.run(causal, SMALL, scorer=oracle(causal))
    assert perfect.metrics["acc"] == 1.0 and perfect.metrics["chain/acc"] == perfect.metrics["values/acc"] == 1.0
    assert perfect.details["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and set(perfect.figures) == {"heatmap"}
    blind = copy.deepcopy(causal)
    torch.nn.init.zeros_(blind.model.lm_head.weight)  # uniform next-token distribution whatever the prompt
    constant = multi_needle.run(blind, SMALL)
    assert constant.metrics["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert constant.metrics["acc"] == pytest.approx(constant.metrics["chance"])
    assert constant.metrics["acc_needles_2"] == pytest.approx(0.5)
    assert constant.metrics["acc_needles_3"] == pytest.approx(1 / 3)


def test_real_decoder_and_encoder_give_accuracies(causal, tiny_mlm_dir):
    options = multi_needle.Options(lengths=[200], needles=[2], samples=2)
    decoder = multi_needle.run(causal, options)
    assert 0 <= decoder.metrics["acc"] <= 1 and decoder.metrics["answer_logprob"] < 0
    assert set(decoder.metrics) >= {"acc_length_200", "acc_needles_2", "chain/acc", "values/acc"}
    templates = metric_names("multi_needle", options, "causal")  # what a study's metric check accepts
    assert all(any(name_matches(t, name) for t in templates) for name in decoder.metrics)
    encoder = multi_needle.run(load_model(str(tiny_mlm_dir)), options)
    assert 0 <= encoder.metrics["acc"] <= 1 and encoder.metrics["answer_logprob"] < 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"needles": [1, 2]}, "multi_needle.needles [1, 2] must each be 2-5"),
        ({"needles": [6]}, "multi_needle.needles [6] must each be 2-5"),
        ({"tasks": ["chain", "sum"]}, "multi_needle.tasks ['chain', 'sum'] must be a non-empty subset"),
        ({"needles": [3], "depths": [0.1, 0.5]}, "multi_needle.depths [0.1, 0.5] must hold at least 3 fractions"),
        ({"lengths": [300]}, "multi_needle.lengths [300] exceed the model's context: 256 tokens"),
        ({"lengths": [60]}, "multi_needle.lengths: 60 tokens cannot hold 2 needles and the question"),
    ],
)
def test_bad_options_are_one_line_errors(causal, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        multi_needle.build_cases(causal, multi_needle.Options(**options))


ESSAYS = Path(__file__).parents[1] / "../shared/data/pg_essays"


@pytest.mark.skipif(not ESSAYS.is_dir(), reason="../shared/data/pg_essays is absent")
def test_a_folder_of_essays_is_the_haystack(causal):
    options = multi_needle.Options(haystack=str(ESSAYS), lengths=[200], needles=[2], samples=1)
    perfect = multi_needle.run(causal, options, scorer=oracle(causal))
    assert perfect.metrics["acc"] == 1.0
    assert " the " in causal.tokenizer.decode(multi_needle.build_cases(causal, options)[0].ids)
