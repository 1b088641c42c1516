"""Fine-tuning policies on hand-written samples: exact ids, masked positions, labels, padding."""

import pytest
import torch

from core.errors import ConfigError
from datamodules.collate import batch_generator
from datamodules.finetune import SFTCollator
from datamodules.policies.finetune import MEAPSFT, PlainSFT
from tests.conftest import BOS, EOS, MASK, PAD

IGNORE = -100


def sample(index: int, prompt: int, answer: int) -> tuple[int, torch.Tensor, int, int]:
    """`<bos>`, `prompt` tokens (ids 10, 11, ...), `answer` tokens (ids 30, 31, ...), `<eos>`;
    the labelled answer span covers the answer and its EOS."""
    ids = torch.tensor([BOS, *(10 + i % 20 for i in range(prompt)), *(30 + i % 30 for i in range(answer)), EOS])
    return index, ids, 1 + prompt, len(ids)


def collate(policy, samples, vocab, max_length=256, seed=0):
    collator = SFTCollator(policy, vocab, seed, max_length)
    block = collator.block(samples)
    return block, policy(block, batch_generator(seed, block.indices.tolist()))


def meap(ratio: float = 0.10, **kwargs) -> MEAPSFT:
    policy = MEAPSFT(**kwargs)
    policy.ratio = ratio  # what FineTuneDataModule does with data.mask_ratio
    return policy


def test_plain_sft_labels_the_answer_and_its_eos_and_pads(vocab):
    _, out = collate(PlainSFT(), [sample(0, 3, 2), sample(1, 1, 1)], vocab)
    assert out["input_ids"].tolist() == [[BOS, 10, 11, 12, 30, 31, EOS], [BOS, 10, 30, EOS, PAD, PAD, PAD]]
    assert out["labels"].tolist() == [[IGNORE] * 4 + [30, 31, EOS], [IGNORE, IGNORE, 30, EOS, IGNORE, IGNORE, IGNORE]]
    assert out["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert not out["masked"].any()


@pytest.mark.parametrize("layout", ["concat", "separate_rows"])
def test_an_answer_of_exactly_50_tokens_trains_as_plain_sft(layout, vocab):
    samples = [sample(0, 9, 50)]
    _, plain = collate(PlainSFT(), samples, vocab)
    _, out = collate(meap(layout=layout), samples, vocab)
    for name in plain:
        assert torch.equal(out[name], plain[name]), name


def test_concat_paper_defaults_on_a_51_token_answer(vocab):
    block, out = collate(meap(), [sample(0, 9, 51)], vocab)
    ids = block.input_ids[0]  # 62 tokens: <bos>, 9 prompt, 51 answer, <eos>
    n = len(ids)
    assert out["input_ids"].shape == (1, 2 * n)
    row, labels, masked = out["input_ids"][0], out["labels"][0], out["masked"][0]
    assert torch.equal(row[:n], ids)  # the original, untouched
    copy = row[n:]
    hidden = (copy == MASK).nonzero().squeeze(1)
    assert len(hidden) == 6  # floor(0.10 * 60 regular tokens of the whole copy)
    assert torch.equal(masked[n:].nonzero().squeeze(1), hidden) and not masked[:n].any()
    assert hidden.min() >= 1 and hidden.max() <= n - 2  # never the copy's BOS or EOS
    assert torch.equal(copy[copy != MASK], ids[copy != MASK])
    # original: loss on the answer and its EOS only; the prompt never carries loss
    assert labels[:10].eq(IGNORE).all() and torch.equal(labels[10:n], ids[10:])
    # copy: its answer (and EOS) and its masked tokens, each the original token at that place
    copy_labels = labels[n:]
    labelled = (copy_labels != IGNORE).nonzero().squeeze(1)
    expected = sorted(set(range(10, n)) | set(hidden.tolist()))
    assert labelled.tolist() == expected
    assert torch.equal(copy_labels[labelled], ids[labelled])
    assert out["attention_mask"].tolist() == [[1] * (2 * n)]


def test_separate_rows_reference_keys_mask_only_the_answer_and_label_only_the_masks(vocab):
    policy = meap(layout="separate_rows", copy_loss="masked_only", mask_span="answer", redraw="once")
    block, out = collate(policy, [sample(0, 9, 51), sample(1, 2, 3)], vocab)
    assert out["input_ids"].shape == (3, 62)  # two originals, one copy (the 3-token answer gets none)
    ids = block.input_ids[0]
    copy, copy_labels = out["input_ids"][2], out["labels"][2]
    hidden = (copy == MASK).nonzero().squeeze(1)
    assert len(hidden) == 5  # floor(0.10 * 51 answer tokens)
    assert hidden.min() >= 10 and hidden.max() <= 60  # inside the answer
    assert (copy_labels != IGNORE).nonzero().squeeze(1).tolist() == hidden.tolist()
    assert torch.equal(copy_labels[hidden], ids[hidden])
    assert torch.equal(out["masked"][2].nonzero().squeeze(1), hidden) and not out["masked"][:2].any()
    # the short sample is plain SFT, padded
    assert out["labels"][1].tolist()[:7] == [IGNORE, IGNORE, IGNORE, 30, 31, 32, EOS]
    assert out["input_ids"][1, 7:].eq(PAD).all() and out["attention_mask"][1].sum() == 7


def test_concat_pads_a_plain_row_beside_a_row_with_a_copy(vocab):
    _, out = collate(meap(), [sample(0, 9, 51), sample(1, 1, 2)], vocab)
    assert out["input_ids"].shape == (2, 124)
    assert out["input_ids"][1].tolist() == [BOS, 10, 30, 31, EOS] + [PAD] * 119
    assert out["labels"][1].tolist() == [IGNORE, IGNORE, 30, 31, EOS] + [IGNORE] * 119
    assert out["attention_mask"][1].sum() == 5 and not out["masked"][1].any()


def test_a_copy_that_does_not_fit_the_block_is_dropped_not_cut(vocab):
    samples = [sample(0, 9, 51)]  # 62 tokens: the concatenated row needs 124
    policy = meap()
    _, plain = collate(PlainSFT(), samples, vocab, max_length=123)
    _, out = collate(policy, samples, vocab, max_length=123)
    for name in plain:
        assert torch.equal(out[name], plain[name]), name
    qualifies, with_copy = policy.copy_plan(torch.tensor([62]), torch.tensor([51]), 123)
    assert qualifies.tolist() == [True] and with_copy.tolist() == [False]
    assert policy.copy_plan(torch.tensor([62]), torch.tensor([51]), 124)[1].tolist() == [True]


def test_once_keeps_a_samples_mask_whatever_the_batch_and_per_step_does_not(vocab):
    a, b, c = sample(7, 9, 51), sample(8, 4, 60), sample(9, 0, 70)
    once = meap(redraw="once")
    _, first = collate(once, [a, b], vocab)
    _, second = collate(once, [c, a], vocab)
    assert torch.equal(first["masked"][0, :124], second["masked"][1, :124])
    per_step = meap()
    _, first = collate(per_step, [a, b], vocab)
    _, second = collate(per_step, [c, a], vocab)
    assert not torch.equal(first["masked"][0, :124], second["masked"][1, :124])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "interleaved"}, "data.masking.init_args.layout must be one of concat, separate_rows"),
        ({"min_answer_tokens": -1}, "data.masking.init_args.min_answer_tokens must be >= 0"),
    ],
)
def test_bad_policy_keys_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        meap(**kwargs)
