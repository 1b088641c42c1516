"""Corpus statistics (the hook: exact counts, counted once, cached, the same in a worker) and the
policies that use them: PMI masking of collocations and rarity-weighted masking."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import datamodules.pretraining
from datamodules import FrequencyMask, PMIMask, PretrainingDataModule, SelectionPolicy, StatsRequest, TokenBlock
from datamodules.corpus_stats import CorpusStats, count_corpus
from datamodules.policies.corpus import ngram_pmi, segmentations
from tests.conftest import BOS, EOS, FIRST_CONTINUATION, MASK, PAD

A, B, C = 30, 31, 32  # a collocation planted in the corpus: A B always together


def corpus(rows: int = 400, length: int = 64, seed: int = 0, plant: bool = True) -> torch.Tensor:
    """Blocks of Zipf-distributed word-start tokens (ids 5..29), BOS first, with A B planted in
    every row (A B C in every fourth, and C three tokens after B in every row); some rows end in
    EOS + padding."""
    g = torch.Generator().manual_seed(seed)
    types = torch.arange(MASK + 1, A)
    weights = 1.0 / torch.arange(1, len(types) + 1)
    ids = types[torch.multinomial(weights, rows * length, replacement=True, generator=g)].view(rows, length)
    ids[:, 0] = BOS
    if plant:
        at = torch.randint(1, length - 12, (rows,), generator=g)
        ids[torch.arange(rows), at], ids[torch.arange(rows), at + 1] = A, B
        ids[torch.arange(0, rows, 4), at[::4] + 2] = C
        ids[torch.arange(rows), at + 5] = C  # C is common apart from A B too
    ids[1::3, -4] = EOS
    ids[1::3, -3:] = PAD
    return ids


def brute_counts(ids: torch.Tensor, vocab, n: int) -> Counter:
    """n-gram counts by a loop over the rows: within a row, regular tokens only."""
    counts: Counter = Counter()
    for row in ids.tolist():
        for i in range(len(row) - n + 1):
            gram = tuple(row[i : i + n])
            if not any(vocab.is_special[t] for t in gram):
                counts[gram] += 1
    return counts


# ---- the statistics --------------------------------------------------------------------------


def test_counts_are_exact_on_a_hand_made_corpus(vocab):
    ids = torch.tensor([[BOS, 5, 6, 7, 5, 6, EOS, BOS], [BOS, 5, 6, 8, 40, EOS, PAD, PAD]])
    stats = count_corpus(ids, vocab, StatsRequest(max_n=3))
    assert stats.token_counts[[5, 6, 7, 8, 40]].tolist() == [3, 3, 1, 1, 1]
    assert stats.token_counts[[PAD, BOS, EOS]].tolist() == [0, 0, 0]
    assert stats.windows.tolist() == [9, 7, 5]  # n-gram positions inside the runs of regular tokens
    grams, counts = stats.ngrams(2)
    assert dict(zip(map(tuple, grams.tolist()), counts.tolist())) == {
        (5, 6): 3,
        (6, 7): 1,
        (7, 5): 1,
        (6, 8): 1,
        (8, 40): 1,
    }
    assert stats.count(torch.tensor([[5, 6, 7], [6, 8, 40], [6, 5, 6]])).tolist() == [1, 1, 0]
    # whole words: (8, 40) is one word and its end; (5, 6, 8) ends inside the word "8 40"
    assert stats.count(torch.tensor([[8, 40]])).tolist() == [1]
    assert stats.word_counts[2][stats.index.lookup(torch.tensor([[5, 6, 8], [6, 8, 40]]))].tolist() == [0, 1]
    frequent = count_corpus(ids, vocab, StatsRequest(max_n=3, min_count=2))
    assert frequent.ngrams(2)[0].tolist() == [[5, 6]] and frequent.ngrams(3)[0].numel() == 0
    assert torch.equal(frequent.token_counts, stats.token_counts)  # token counts stay complete


def test_counts_match_a_loop_over_a_random_corpus(vocab):
    ids = corpus(rows=40, length=32)
    stats = count_corpus(ids, vocab, StatsRequest(max_n=4, min_count=2))
    for n in (2, 3, 4):
        expected = {g: c for g, c in brute_counts(ids, vocab, n).items() if c >= 2}
        grams, counts = stats.ngrams(n)
        assert dict(zip(map(tuple, grams.tolist()), counts.tolist())) == expected
        assert stats.windows[n - 1] == sum(brute_counts(ids, vocab, n).values())


class StatsHungry(SelectionPolicy):
    """A policy that only keeps the statistics it is handed."""

    corpus_stats = StatsRequest(max_n=2, min_count=1)

    def __init__(self) -> None:
        super().__init__("mlm")
        self.received: list[CorpusStats] = []

    def setup_corpus(self, stats: CorpusStats) -> None:
        self.received.append(stats)

    def select(self, block, generator):
        return torch.zeros_like(block.special)


def tiny_datamodule(tmp_path, policy, **overrides) -> PretrainingDataModule:
    args = dict(builtin_documents=120, vocab_size=512, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    return PretrainingDataModule(masking=policy, **{**args, **overrides})


def test_the_datamodule_counts_once_caches_and_hands_the_statistics_over(tmp_path, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return count_corpus(*args, **kwargs)

    monkeypatch.setattr(datamodules.pretraining, "count_corpus", counting)
    first = tiny_datamodule(tmp_path, StatsHungry())
    first.prepare_data()
    first.setup("fit")
    assert len(calls) == 1  # prepare_data counted; setup loaded the cache
    [stats] = first.policy.received
    blocks = torch.from_numpy(first.train_blocks.astype("int64"))
    regular = ~first.vocab.is_special[blocks]
    assert torch.equal(stats.token_counts, torch.bincount(blocks[regular], minlength=first.vocab.size))
    assert len(list((tmp_path / "cache" / "stats").glob("*.pt"))) == 1

    second = tiny_datamodule(tmp_path, StatsHungry())
    second.prepare_data()
    second.setup("fit")
    assert len(calls) == 1  # reused, not recounted
    [again] = second.policy.received
    assert torch.equal(again.token_counts, stats.token_counts)
    assert all(torch.equal(a, b) for a, b in zip(again.counts, stats.counts))

    other_data = tiny_datamodule(tmp_path, StatsHungry(), block_size=16)
    other_data.setup("fit")
    assert len(calls) == 2  # keyed by the data: other blocks, other counts


def test_a_policy_without_a_request_gets_no_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(datamodules.pretraining, "count_corpus", lambda *a: pytest.fail("counted for nobody"))
    dm = tiny_datamodule(tmp_path, datamodules.RandomMLMMask())
    dm.prepare_data()
    dm.setup("fit")
    assert not (tmp_path / "cache" / "stats").exists()


def test_a_dataloader_worker_masks_as_the_main_process_does(tmp_path):
    masks = []
    for workers in (0, 1):
        dm = tiny_datamodule(tmp_path, PMIMask(vocabulary_size=200, min_count=2), mask_ratio=0.15, num_workers=workers)
        dm.prepare_data()
        dm.setup("fit")
        loader = iter(dm.train_dataloader())
        masks.append(torch.stack([next(loader)["masked"] for _ in range(3)]))
    assert masks[0].any()
    assert torch.equal(masks[0], masks[1])


# ---- PMI -------------------------------------------------------------------------------------


def test_segmentations_are_every_cut_into_two_or_more_parts():
    assert segmentations(2) == [[(0, 1), (1, 2)]]
    assert sorted(segmentations(3)) == sorted([[(0, 2), (2, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]])
    assert len(segmentations(5)) == 2**4 - 1


def test_pmi_is_the_hand_computed_minimum_over_splits(vocab):
    ids = corpus(rows=200, length=48)
    stats = count_corpus(ids, vocab, StatsRequest(max_n=3, min_count=1))
    counts = {n: brute_counts(ids, vocab, n) for n in (1, 2, 3)}
    total = {n: sum(c.values()) for n, c in counts.items()}

    def log_p(gram: tuple[int, ...]) -> float:
        return math.log(counts[len(gram)][gram] / total[len(gram)])

    grams, scores = ngram_pmi(stats, 2)
    pmi2 = dict(zip(map(tuple, grams.tolist()), scores.tolist()))
    assert pmi2[A, B] == pytest.approx(log_p((A, B)) - log_p((A,)) - log_p((B,)))
    chance = max(pmi2, key=lambda g: counts[2][g])  # the most frequent pair: two frequent tokens
    assert A not in chance and pmi2[A, B] > pmi2[chance] + 2.0  # the collocation, far above chance

    grams, scores = ngram_pmi(stats, 3)
    pmi3 = dict(zip(map(tuple, grams.tolist()), scores.tolist()))
    splits = {
        "A|B C": log_p((A, B, C)) - log_p((A,)) - log_p((B, C)),
        "A B|C": log_p((A, B, C)) - log_p((A, B)) - log_p((C,)),
        "A|B|C": log_p((A, B, C)) - log_p((A,)) - log_p((B,)) - log_p((C,)),
    }
    assert pmi3[A, B, C] == pytest.approx(min(splits.values()))
    assert min(splits, key=splits.get) == "A B|C"  # the weakest split: C follows A B a quarter of the time


def pmi_policy(vocab, ids, ratio: float = 0.15, **kwargs) -> PMIMask:
    policy = PMIMask(**{"vocabulary_size": 8, "max_n": 3, "min_count": 5, "length_shares": (0.5, 0.5), **kwargs})
    policy.ratio = ratio
    policy.setup(vocab)
    policy.setup_corpus(count_corpus(ids, vocab, policy.corpus_stats))
    return policy


def test_pmi_vocabulary_is_exactly_the_planted_collocations(vocab):
    policy = pmi_policy(vocab, corpus(), vocabulary_size=1, max_n=2, length_shares=(1.0,))
    assert [g.tolist() for g in policy.vocabulary] == [[[A, B]]]
    policy = pmi_policy(vocab, corpus(), vocabulary_size=2, max_n=3, length_shares=(0.5, 0.5))
    assert [g.tolist() for g in policy.vocabulary] == [[[A, B]], [[A, B, C]]]
    unplanted = pmi_policy(vocab, corpus(plant=False), vocabulary_size=100, max_n=2, length_shares=(1.0,))
    assert A not in unplanted.vocabulary[0]


def test_pmi_masks_whole_ngrams_and_meets_the_ratio(vocab):
    ids = corpus(rows=400, length=256, seed=1)  # ~1e5 tokens
    policy = pmi_policy(vocab, corpus(), vocabulary_size=2)
    block = TokenBlock.from_ids(ids, vocab)
    out = policy(block, torch.Generator().manual_seed(0))
    masked, maskable = out["masked"], ~block.special
    assert not (masked & block.special).any()
    assert masked.sum() / maskable.sum() == pytest.approx(0.15, abs=0.002)
    start = (ids[:, :-2] == A) & (ids[:, 1:-1] == B)  # every A B, and A B C, is masked whole or not at all
    assert torch.equal(masked[:, :-2][start], masked[:, 1:-1][start])
    abc = start & (ids[:, 2:] == C)
    assert torch.equal(masked[:, :-2][abc], masked[:, 2:][abc])
    assert masked[:, :-2][start].float().mean() > 0.05  # the collocations are chosen
    assert torch.equal(out["labels"], ids.masked_fill(~masked, -100))


def test_pmi_units_are_whole_words_and_the_longer_overlapping_ngram(vocab):
    policy = pmi_policy(vocab, corpus(), vocabulary_size=2)
    word = FIRST_CONTINUATION  # a continuation: "5 40" is one word
    ids = torch.tensor([[BOS, A, B, C, 5, word, word + 1, A, B, word, 6, EOS]])
    units = policy.units(TokenBlock.from_ids(ids, vocab))[0].tolist()
    assert units[1] == units[2] == units[3]  # A B C: the trigram beats the bigram inside it
    assert units[4] == units[5] == units[6] != units[3]  # a whole word
    assert len({units[7], units[8], units[9]}) == 2 and units[8] == units[9]  # A B ends inside a word: no match
    assert units[10] not in units[:10]


def test_pmi_before_its_statistics_is_an_error_and_bad_keys_are_named(vocab):
    policy = PMIMask()
    policy.ratio = 0.15
    with pytest.raises(RuntimeError, match=r"PMIMask.setup_corpus\(stats\) must run before masking"):
        policy(TokenBlock.from_ids(corpus(rows=2), vocab), torch.Generator())
    with pytest.raises(ValueError, match=r"^data.masking.init_args.max_n must be >= 2, got 1$"):
        PMIMask(max_n=1)
    with pytest.raises(ValueError, match=r"^data.masking.init_args.length_shares must be 3 shares >= 0"):
        PMIMask(max_n=4)
    with pytest.raises(ValueError, match=r"^data.masking.init_args.vocabulary_size must be >= 1, got 0$"):
        PMIMask(vocabulary_size=0)
    with pytest.raises(ValueError, match=r"^data.masking.init_args.min_count must be >= 1, got 0$"):
        PMIMask(min_count=0)
    with pytest.raises(ValueError, match=r"^corpus_stats.max_n must be >= 1, got 0$"):
        StatsRequest(max_n=0)


# ---- frequency -------------------------------------------------------------------------------


def frequency_policy(vocab, ids, power: float, ratio: float = 0.15) -> FrequencyMask:
    policy = FrequencyMask(power=power)
    policy.ratio = ratio
    policy.setup(vocab)
    policy.setup_corpus(count_corpus(ids, vocab, policy.corpus_stats))
    return policy


@pytest.mark.parametrize("power", [0.0, 0.5, 2.0])
def test_frequency_expected_share_is_the_ratio_over_the_corpus(vocab, power):
    ids = corpus(rows=400, length=256, seed=2)
    policy = frequency_policy(vocab, ids, power)
    counts = policy.counts
    p = policy.probabilities().double()
    assert float((counts * p).sum() / counts.sum()) == pytest.approx(0.15, rel=1e-6)
    block = TokenBlock.from_ids(ids, vocab)
    masked = policy(block, torch.Generator().manual_seed(0))["masked"]
    assert not (masked & block.special).any()
    assert masked.sum() / (~block.special).sum() == pytest.approx(0.15, abs=0.005)
    if power == 0.0:
        assert torch.allclose(p[counts > 0], torch.full_like(p[counts > 0], 0.15))


def test_frequency_masks_rarer_types_more_often(vocab):
    ids = corpus(rows=400, length=256, seed=3)
    policy = frequency_policy(vocab, ids, power=1.0)
    counts, p = policy.counts, policy.probabilities()
    seen = (counts > 0).nonzero().squeeze(1)
    by_count = seen[counts[seen].argsort()]  # rarest first
    assert (p[by_count].diff() <= 1e-7).all()  # probability falls as the count rises
    masked = policy(TokenBlock.from_ids(ids, vocab), torch.Generator().manual_seed(0))["masked"]
    rate = lambda t: masked[ids == t].float().mean().item()
    frequent, rare = MASK + 1, A - 1  # the most and least frequent Zipf types
    assert rate(rare) > 3 * rate(frequent)
    with pytest.raises(ValueError, match=r"^data.masking.init_args.power must be a finite number, got nan$"):
        FrequencyMask(power=float("nan"))
