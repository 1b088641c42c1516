import pytest
import torch

from core.errors import DataError
from datamodules.masking import IGNORE_INDEX, TokenBlock
from datamodules.policies.sentence import (
    LastTokenMask,
    MatchedRandomMask,
    PenultimateTokenMask,
    SentencePositionMask,
    rank_from_end,
)
from tests.conftest import BOS, EOS, FULL_STOP, MASK, PAD, random_ids

FS = FULL_STOP
#            0    1   2   3   4   5   6   7   8   9    10   11  12  13
SENTENCES = [BOS, 20, 21, 22, FS, 23, 24, FS, 25, EOS, BOS, 26, 27, 28]  # the last sentence is cut off
# sentences: [BOS 20 21 22 .] [23 24 .] [25 EOS] | [BOS 26 27 28 ...] (no end in this block)


def select(policy, ids, vocab, seed=0):
    return policy.select(TokenBlock.from_ids(torch.as_tensor(ids), vocab), torch.Generator().manual_seed(seed))


def positions(mask):
    return [row.nonzero().squeeze(1).tolist() for row in mask]


def test_rank_counts_regular_tokens_from_each_sentence_end(vocab):
    rank = rank_from_end(TokenBlock.from_ids(torch.tensor([SENTENCES]), vocab))
    assert rank.tolist() == [[0, 4, 3, 2, 1, 3, 2, 1, 1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (PenultimateTokenMask(), [3, 6]),  # 22 and 24; the one-word sentence "25 EOS" has none
        (LastTokenMask(), [4, 7, 8]),  # the full stops, and 25 before the EOS
        (PenultimateTokenMask(unit="document"), [7]),  # the full stop before "25 EOS"
        (LastTokenMask(unit="document"), [8]),
        (PenultimateTokenMask(unit="block"), [12]),  # the row is one unit, cut or not
        (SentencePositionMask(from_end=3), [2, 5]),
    ],
    ids=["penultimate", "last", "doc-penultimate", "doc-last", "block-penultimate", "third-from-end"],
)
def test_exact_positions_on_hand_written_sentences(policy, expected, vocab):
    assert positions(select(policy, [SENTENCES], vocab)) == [expected]


def test_full_stop_before_eos_and_padding(vocab):
    # "20 21 . EOS" then padding: the EOS is a sentence of its own, with no regular token
    ids = [[BOS, 20, 21, FS, EOS, PAD, PAD], [BOS, 30, 31, 32, EOS, PAD, PAD]]
    assert positions(select(PenultimateTokenMask(), ids, vocab)) == [[2], [2]]
    assert positions(select(LastTokenMask(), ids, vocab)) == [[3], [3]]


def test_mlm_and_causal_corruption_of_the_penultimate_token(vocab):
    ids = torch.tensor([SENTENCES])
    block = TokenBlock.from_ids(ids, vocab)
    mlm = PenultimateTokenMask(mask_prob=1.0, random_prob=0.0)(block, torch.Generator().manual_seed(0))
    assert (mlm["labels"] != IGNORE_INDEX).nonzero()[:, 1].tolist() == [3, 6]
    assert mlm["labels"][0, [3, 6]].tolist() == [22, 24]
    assert (mlm["input_ids"] == MASK).nonzero()[:, 1].tolist() == [3, 6]
    causal = PenultimateTokenMask(objective="causal")(block, torch.Generator().manual_seed(0))
    assert torch.equal(causal["labels"], ids)  # next-token targets stay the text
    assert (causal["input_ids"] == MASK).nonzero()[:, 1].tolist() == [3, 6]


def sentence_rows(rows, length, vocab, seed=0):
    """Random regular tokens with full stops every 3-20 tokens and a BOS .. EOS document frame."""
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(rows, length, vocab, seed)
    ids[torch.rand(ids.shape, generator=g) < 0.08] = FS
    ids[:, 0], ids[:, -1] = BOS, EOS
    return ids


def test_matched_control_masks_the_same_count_per_sequence_elsewhere(vocab):
    ids = sentence_rows(400, 64, vocab)
    block = TokenBlock.from_ids(ids, vocab)
    penultimate = PenultimateTokenMask().select(block, torch.Generator().manual_seed(1))
    control = MatchedRandomMask().select(block, torch.Generator().manual_seed(1))
    assert torch.equal(control.sum(1), penultimate.sum(1))  # exactly, sequence by sequence
    assert penultimate.sum() > 1000
    assert not (control & vocab.is_special[ids]).any()
    # spread over all regular tokens, not on the penultimate ones: overlap at the base rate
    base_rate = penultimate.sum() / (~vocab.is_special[ids]).sum()
    overlap = (control & penultimate).sum() / control.sum()
    assert abs(overlap - base_rate) < 0.03
    # last-token matching follows its own count
    last = LastTokenMask().select(block, torch.Generator())
    assert torch.equal(MatchedRandomMask(from_end=1).select(block, torch.Generator()).sum(1), last.sum(1))


def test_matched_control_draws_from_the_generator(vocab):
    ids = sentence_rows(8, 64, vocab)
    a, b, c = (select(MatchedRandomMask(), ids, vocab, seed) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_data_without_sentence_boundaries_is_a_data_error(vocab):
    ids = torch.randint(20, 40, (2, 16))  # no full stop, no EOS
    for policy in (PenultimateTokenMask(), LastTokenMask(), MatchedRandomMask()):
        with pytest.raises(DataError, match="no sentence end"):
            select(policy, ids, vocab)
    assert positions(select(PenultimateTokenMask(unit="block"), ids, vocab)) == [[14], [14]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"from_end": 0}, "data.masking.init_args.from_end must be >= 1, got 0"),
        ({"unit": "paragraph"}, "data.masking.init_args.unit must be one of"),
        ({"objective": "seq2seq"}, "objective must be 'mlm' or 'causal'"),
    ],
)
def test_bad_arguments_name_their_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SentencePositionMask(**kwargs)
