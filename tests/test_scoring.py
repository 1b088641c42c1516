"""Scoring primitives against the computation done by hand, one sequence at a time."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from evaluation.model import load_model
from evaluation.scoring import (
    answer_logprobs,
    answers,
    causal_logprobs,
    contains_answer,
    exact_match,
    normalize,
    pseudo_log_likelihoods,
    sentence_scores,
)


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    return load_model(str(tiny_causal_dir))


@pytest.fixture(scope="module")
def masked(tiny_mlm_dir):
    return load_model(str(tiny_mlm_dir))


def test_pll_of_a_three_token_sentence_is_the_hand_sum(masked):
    bos, eos, mask = masked.vocab.bos_id, masked.vocab.eos_id, masked.vocab.mask_id
    sentence = [bos, 40, 41, 42, eos]
    by_hand = 0.0
    with torch.no_grad():
        for t in (1, 2, 3):  # each regular token masked alone
            ids = torch.tensor([sentence])
            ids[0, t] = mask
            logits = masked.model(input_ids=ids).logits[0, t]
            by_hand += torch.log_softmax(logits, -1)[sentence[t]].item()
    longer = [bos, *range(50, 60), eos]  # batched with a longer sentence: padding must not change the score
    batched = pseudo_log_likelihoods(masked, [sentence, longer], rows_per_batch=4)
    assert_close(batched[0], torch.tensor(by_hand), atol=1e-4, rtol=1e-4)


def test_causal_logprobs_match_cross_entropy_and_ignore_padding(causal):
    sequences = [[causal.vocab.bos_id, 40, 41, 42], [causal.vocab.bos_id, *range(50, 70)]]
    batched = causal_logprobs(causal, sequences, batch_size=2)
    for seq, score in zip(sequences, batched):
        ids = torch.tensor([seq])
        with torch.no_grad():
            logits = causal.model(input_ids=ids).logits[0, :-1]
        assert_close(score, -F.cross_entropy(logits, ids[0, 1:], reduction="sum"), atol=1e-4, rtol=1e-4)


def test_sentence_scores_use_each_objective(causal, masked):
    for loaded in (causal, masked):
        scores = sentence_scores(loaded, ["The cat sat.", "Cat the sat."])
        assert scores.shape == (2,) and torch.isfinite(scores).all() and (scores < 0).all()


def test_greedy_answers_are_the_same_with_and_without_the_kv_cache(causal):
    prompts = [[causal.vocab.bos_id, *range(40, 40 + n)] for n in (5, 9, 12)]
    with_cache = answers(causal, prompts, 4, batch_size=2, use_cache=True)
    without = answers(causal, prompts, 4, batch_size=2, use_cache=False)
    assert with_cache == without
    # left padding does not change an answer: each prompt alone gives the same text
    assert [answers(causal, [p], 4)[0] for p in prompts] == with_cache


def test_an_encoder_answers_by_filling_mask_slots(masked):
    prompt = [masked.vocab.bos_id, *range(40, 48)]
    ids = torch.tensor([[*prompt, masked.vocab.mask_id, masked.vocab.mask_id, masked.vocab.eos_id]])
    with torch.no_grad():
        expected = masked.model(input_ids=ids).logits[0, len(prompt) : len(prompt) + 2].argmax(-1)
    decoded = masked.tokenizer.decode(expected.tolist(), skip_special_tokens=True).strip().split("\n")[0]
    assert answers(masked, [prompt], 2) == [decoded]


def test_answer_matching_rules():
    assert normalize("The  Code, of X!") == "code of x"
    assert exact_match("4812. The code", "4812")
    assert not exact_match("is 4812", "4812")  # must come first
    assert not exact_match("48120", "4812")
    assert contains_answer("it is 4812.", ["1234", "4812"])
    assert not contains_answer("it is 48123", ["4812"])


def test_answer_logprobs_score_only_the_answer(causal, masked):
    prompt, answer = [causal.vocab.bos_id, *range(40, 50)], [60, 61, 62]
    whole, prefix = causal_logprobs(causal, [prompt + answer, prompt])
    assert_close(
        answer_logprobs(causal, [prompt, prompt[:4]], [answer, answer])[0], whole - prefix, atol=1e-4, rtol=1e-4
    )
    ids = torch.tensor(
        [[*prompt, masked.vocab.mask_id, masked.vocab.mask_id, masked.vocab.mask_id, masked.vocab.eos_id]]
    )
    with torch.no_grad():
        log_probs = torch.log_softmax(masked.model(input_ids=ids).logits[0], -1)
    by_hand = sum(log_probs[len(prompt) + j, t] for j, t in enumerate(answer))
    assert_close(answer_logprobs(masked, [prompt, prompt[:6]], [answer, [70]])[0], by_hand, atol=1e-4, rtol=1e-4)
