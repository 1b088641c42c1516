import pytest
import torch

from core.errors import DataError
from datamodules.masking import IGNORE_INDEX, TokenBlock
from datamodules.policies.span import FixedSpanMask, GeometricSpanMask, WholeWordMask, lay_out, take_in_order
from datamodules.tokenizer import train_bpe, vocab_of
from tests.conftest import BOS, EOS, FIRST_CONTINUATION, MASK, random_ids


def select(policy, ids, vocab, ratio=0.15, seed=0):
    policy.ratio = ratio
    return policy.select(TokenBlock.from_ids(ids, vocab), torch.Generator().manual_seed(seed))


def runs(flags):
    """Lengths of the runs of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), flags, torch.tensor([False])]).int()
    edges = padded.diff()
    return ((edges == -1).nonzero() - (edges == 1).nonzero()).squeeze(1).tolist()


def test_take_in_order_meets_the_budget_in_expectation():
    lengths = torch.tensor([3, 3, 3, 3])
    taken = [int(take_in_order(lengths, 4.5, 100, torch.Generator().manual_seed(s)).sum()) for s in range(2000)]
    assert set(taken) == {1, 2}  # within one span of 4.5 tokens
    assert abs(sum(taken) / len(taken) * 3 - 4.5) < 0.15  # 1 span + half the time a second
    assert take_in_order(lengths, 12.0, 7, torch.Generator()).tolist() == [True, True, False, False]  # capacity


def test_lay_out_places_exactly_the_spans():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        masked = lay_out(torch.tensor([5, 2, 7]), 40, g)
        assert masked.sum() == 14
        assert sum(runs(masked)) == 14 and all(r in (2, 5, 7, 9, 12, 14) for r in runs(masked))


@pytest.mark.parametrize("span", [5, 50])
def test_fixed_spans_hit_the_budget_within_one_span(span, vocab):
    ids = random_ids(32, 128, vocab)  # BOS/EOS at each row's ends, never masked
    maskable = ids.numel() - 2 * 32
    totals = []
    for seed in range(40):
        masked = select(FixedSpanMask(span), ids, vocab, seed=seed)
        assert not masked[:, [0, -1]].any()
        total = int(masked.sum())
        assert abs(total - 0.15 * maskable) <= span
        in_reading_order = masked[:, 1:-1].flatten()  # specials skipped, rows joined
        assert all(r % span == 0 for r in runs(in_reading_order))  # whole spans (adjacent ones merge)
        totals.append(total)
    assert abs(sum(totals) / len(totals) / maskable - 0.15) < 0.01


def test_geometric_spans_follow_spanbert(vocab):
    policy = GeometricSpanMask()
    assert policy.mean_length == pytest.approx(3.8, abs=0.01)  # the mean SpanBERT reports
    lengths = policy.draw_lengths(20000, torch.Generator().manual_seed(0))
    assert lengths.min() == 1 and lengths.max() == 10
    assert lengths.float().mean().item() == pytest.approx(3.8, abs=0.06)
    assert (lengths == 1).float().mean().item() == pytest.approx(0.2 / (1 - 0.8**10), abs=0.015)
    ids = random_ids(32, 128, vocab)
    for seed in range(10):
        assert abs(int(select(policy, ids, vocab, seed=seed).sum()) - 0.15 * (ids.numel() - 64)) <= 10


def test_whole_word_masking_masks_whole_words_within_one_word(vocab):
    c = FIRST_CONTINUATION
    #                   word   --------   word  word ---   EOS BOS word ---
    ids = torch.tensor([[BOS, 5, c, c + 1, 6, 7, c + 2, EOS, BOS, c + 3, 8]])  # c+3 after BOS starts a word
    for ratio, seed in ((0.5, 0), (0.5, 1), (0.3, 2)):
        masked = select(WholeWordMask(), ids, vocab, ratio, seed)[0].tolist()
        assert masked[1] == masked[2] == masked[3] and masked[5] == masked[6]
        assert not masked[0] and not masked[7] and not masked[8]
    assert select(WholeWordMask(), ids, vocab, 1.0)[0].tolist() == [False] + [True] * 6 + [False, False, True, True]
    big = random_ids(64, 128, vocab)
    starts = vocab.is_word_start[big]
    totals = []
    for seed in range(20):
        masked = select(WholeWordMask(), big, vocab, seed=seed)
        # a continuation token is masked exactly when the token before it is (within regular tokens)
        inner = ~starts[:, 1:] & ~vocab.is_special[big[:, :-1]]
        assert torch.equal(masked[:, 1:][inner], masked[:, :-1][inner])
        total = int(masked.sum())
        totals.append(total)
    maskable = big.numel() - 128
    assert abs(sum(totals) / len(totals) / maskable - 0.15) < 0.01


def test_span_policies_corrupt_for_either_objective(vocab):
    ids = random_ids(4, 64, vocab)
    block = TokenBlock.from_ids(ids, vocab)
    causal = FixedSpanMask(5, objective="causal")
    causal.ratio = 0.3
    batch = causal(block, torch.Generator().manual_seed(0))
    assert torch.equal(batch["input_ids"] == MASK, batch["masked"]) and torch.equal(batch["labels"], ids)
    mlm = FixedSpanMask(5)
    mlm.ratio = 0.3
    batch = mlm(block, torch.Generator().manual_seed(0))
    assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["masked"])


def test_byte_level_word_starts_are_tokens_with_a_leading_space():
    tokenizer = train_bpe(["the cat sat on the mat. a dog ran far away."] * 20, 300)
    vocab = vocab_of(tokenizer)
    ids = tokenizer("the cat sat on the mat.", add_special_tokens=False)["input_ids"]
    surfaces = [tokenizer.decode([i]) for i in ids]
    assert [bool(vocab.is_word_start[i]) for i in ids] == [s.startswith(" ") for s in surfaces]
    assert vocab.is_word_start[[vocab.bos_id, vocab.eos_id, vocab.pad_id]].all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FixedSpanMask(0), "data.masking.init_args.span_length must be >= 1, got 0"),
        (lambda: FixedSpanMask(-3), "data.masking.init_args.span_length must be >= 1, got -3"),
        (lambda: GeometricSpanMask(p=0.0), "data.masking.init_args.p must be in \\(0, 1\\], got 0.0"),
        (lambda: GeometricSpanMask(max_length=0), "data.masking.init_args.max_length must be >= 1, got 0"),
    ],
)
def test_bad_span_arguments_name_their_key(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_budget_that_cannot_be_met_is_a_data_error(vocab):
    ids = random_ids(2, 16, vocab)  # 28 maskable tokens in the whole batch
    with pytest.raises(DataError, match="span_length=50 is longer than the 28 maskable tokens.*cannot be met"):
        select(FixedSpanMask(50), ids, vocab)
    assert not select(FixedSpanMask(50), ids, vocab, ratio=0.0).any()  # no budget, nothing to meet
