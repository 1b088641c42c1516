"""Needle in a haystack: prompts hold the needle where asked, oracles score 1, constants 0."""

import re
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from evaluation import needle
from evaluation.model import load_model

SMALL = needle.Options(lengths=[120, 240], depths=3, samples=2)


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    return load_model(str(tiny_causal_dir))


def oracle(loaded):
    """Reads the prompt like a perfect model: finds the fact the question asks about."""

    def answer(prompts, _new_tokens):
        out = []
        for ids in prompts:
            text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
            asked = re.search(r"Recall: the (\w+) of (\w+) is$", text)
            out.append(re.search(rf"The {asked[1]} of {asked[2]} is (\d+)\.", text)[1] + ".")
        return out

    return answer


def test_prompts_have_the_exact_length_and_the_needle_at_its_depth(causal):
    cases = needle.build_cases(causal, SMALL, new_tokens=6)
    assert len(cases) == 2 * 3 * 2
    for case in cases:
        assert len(case.ids) == case.length
        text = causal.tokenizer.decode(case.ids, skip_special_tokens=True)
        assert f"is {case.value}." in text and text.endswith("is")
    depths = np.array([c.depth for c in cases]).reshape(2, 3, 2)
    assert (depths[:, 0] == 0).all()  # depth 0: the needle opens the haystack
    assert (depths[:, 1] > 0.15).all() and (depths[:, 1] < 0.85).all()  # the nearest sentence boundary to 50%
    assert (depths[:, 2] > 0.55).all() and (depths[:, 2] > depths[:, 1]).all()  # after the last whole sentence


def test_an_oracle_scores_1_and_a_constant_model_0(causal):
    perfect = needle.run(causal, SMALL, answerer=oracle(causal))
    assert perfect.metrics["acc"] == 1.0 and perfect.metrics["rouge1_recall"] == 1.0
    constant = needle.run(causal, SMALL, answerer=lambda prompts, n: ["1234."] * len(prompts))
    assert constant.metrics["acc"] < 0.1 and constant.metrics["acc_length_120"] < 0.2
    assert set(perfect.figures) == {"heatmap"} and perfect.details["exact_match"] == [[1.0, 1.0]] * 3


def test_a_real_model_runs_with_and_without_the_kv_cache(causal, tiny_mlm_dir):
    cached = needle.run(causal, needle.Options(lengths=[80], depths=2, samples=2))
    uncached = needle.run(causal, needle.Options(lengths=[80], depths=2, samples=2, use_cache=False))
    assert cached.details["examples"] == uncached.details["examples"]
    assert (
        cached.metrics["value_logprob"] == uncached.metrics["value_logprob"] < 0
    )  # teacher-forced: no decoding involved
    encoder = needle.run(load_model(str(tiny_mlm_dir)), needle.Options(lengths=[80], depths=2, samples=1))
    assert 0.0 <= encoder.metrics["acc"] <= 1.0


def test_a_length_beyond_the_context_is_refused(causal):
    with pytest.raises(ConfigError, match=r"needle.lengths \[300\] exceed the model's context: 256 tokens"):
        needle.run(causal, needle.Options(lengths=[100, 300]))


def test_default_lengths_fill_the_context(causal):
    assert max(needle.needle_lengths(causal, needle.Options(), new_tokens=6)) == 250


ESSAYS = Path(__file__).parents[1] / "../shared/data/pg_essays"


@pytest.mark.skipif(not ESSAYS.is_dir(), reason="../shared/data/pg_essays is absent")
def test_a_folder_of_essays_is_the_haystack(causal):
    options = needle.Options(haystack=str(ESSAYS), lengths=[200], depths=2, samples=1)
    perfect = needle.run(causal, options, answerer=oracle(causal))
    assert perfect.metrics["acc"] == 1.0
    text = causal.tokenizer.decode(needle.build_cases(causal, options, new_tokens=6)[0].ids, skip_special_tokens=True)
    assert " the " in text and "Recall: the" in text
