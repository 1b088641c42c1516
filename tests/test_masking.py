import pytest
import torch

from datamodules.collate import MaskingCollator, batch_generator
from datamodules.masking import IGNORE_INDEX, TokenBlock
from datamodules.policies.standard import MEAPInputMask, NoMask, RandomMLMMask
from tests.conftest import EOS, MASK, PAD, random_ids

N_ROWS, LENGTH = 800, 128  # 102,400 tokens


def apply(policy, ids, vocab, seed=0, ratio=0.15):
    if policy.uses_ratio:
        policy.ratio = ratio
    return policy(TokenBlock.from_ids(ids, vocab), torch.Generator().manual_seed(seed))


def test_random_mlm_ratio_and_80_10_10_split(vocab):
    ids = random_ids(N_ROWS, LENGTH, vocab)
    batch = apply(RandomMLMMask(), ids, vocab)
    masked = batch["masked"]
    eligible = ids.numel() - 2 * N_ROWS  # BOS/EOS never masked
    p, n = 0.15, eligible
    assert abs(masked.sum().item() - p * n) < 3 * (n * p * (1 - p)) ** 0.5
    chosen = masked.sum().item()
    to_mask = (batch["input_ids"] == MASK) & masked
    kept = (batch["input_ids"] == ids) & masked
    replaced = masked & ~to_mask & ~kept
    # kept includes random draws that hit the original token (1/59 of the 10%): negligible at 3 sigma
    for share, expected in ((to_mask, 0.8), (replaced, 0.1 * 58 / 59), (kept, 0.1 + 0.1 / 59)):
        sigma = (chosen * expected * (1 - expected)) ** 0.5
        assert abs(share.sum().item() - expected * chosen) < 3 * sigma
    # labels exactly at the masked positions, equal to the original tokens
    assert torch.equal(batch["labels"] != IGNORE_INDEX, masked)
    assert torch.equal(batch["labels"][masked], ids[masked])
    # random replacements are never special tokens
    assert not vocab.is_special[batch["input_ids"][replaced]].any()


def test_special_tokens_and_padding_never_masked(vocab):
    ids = random_ids(200, 64, vocab)
    ids[:, 40:] = PAD
    ids[:, 39] = EOS
    for policy in (RandomMLMMask(), MEAPInputMask()):
        batch = apply(policy, ids, vocab, ratio=0.9)
        assert not batch["masked"][vocab.is_special[ids]].any()
        assert batch["masked"].any()
    assert (apply(MEAPInputMask(), ids, vocab, ratio=0.9)["labels"][:, 40:] == IGNORE_INDEX).all()


def test_meap_labels_are_the_unmasked_tokens(vocab):
    ids = random_ids(N_ROWS, LENGTH, vocab)
    batch = apply(MEAPInputMask(), ids, vocab)
    assert torch.equal(batch["labels"], ids)  # the module shifts: position t predicts labels[t+1]
    assert torch.equal(batch["input_ids"] == MASK, batch["masked"])
    assert torch.equal(batch["input_ids"][~batch["masked"]], ids[~batch["masked"]])
    n = ids.numel() - 2 * N_ROWS
    assert abs(batch["masked"].sum().item() - 0.15 * n) < 3 * (n * 0.15 * 0.85) ** 0.5


def test_meap_shared_positions_reproduce_the_reference(vocab):
    ids = random_ids(16, 64, vocab)
    batch = apply(MEAPInputMask(shared_positions=True, mask_special_tokens=True), ids, vocab, ratio=0.3)
    assert (batch["masked"] == batch["masked"][0]).all()  # one pattern for the whole batch
    per_row = apply(MEAPInputMask(), ids, vocab, ratio=0.3)["masked"]
    assert not (per_row == per_row[0]).all()


def test_no_mask_keeps_the_text(vocab):
    ids = random_ids(4, 16, vocab)
    batch = apply(NoMask(), ids, vocab)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], ids)
    assert not batch["masked"].any()


def test_same_seed_same_mask_other_seed_other_mask(vocab):
    ids = random_ids(8, 64, vocab)
    a, b, c = (apply(RandomMLMMask(), ids, vocab, seed=s) for s in (1, 1, 2))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["masked"], b["masked"])
    assert not torch.equal(a["masked"], c["masked"])


def test_collate_seed_depends_on_batch_members_not_history(vocab):
    ids = random_ids(6, 32, vocab)
    collate = MaskingCollator(policy := RandomMLMMask(), vocab, seed=0)
    policy.ratio = 0.15
    samples = [(i, ids[i]) for i in range(3)]
    first = collate(samples)
    collate([(i, ids[i]) for i in range(3, 6)])  # an unrelated batch in between changes nothing
    assert torch.equal(collate(samples)["masked"], first["masked"])
    assert not torch.equal(collate([(i + 10, ids[i]) for i in range(3)])["masked"], first["masked"])
    assert batch_generator(0, [1, 2]).initial_seed() != batch_generator(1, [1, 2]).initial_seed()


def test_changing_the_ratio_changes_the_next_batch(vocab):
    ids = random_ids(64, 128, vocab)
    policy = RandomMLMMask()
    collate = MaskingCollator(policy, vocab, seed=0)
    samples = [(i, ids[i]) for i in range(64)]
    policy.ratio = 0.15
    low = collate(samples)["masked"].float().mean().item()
    policy.ratio = 0.5
    high = collate(samples)["masked"].float().mean().item()
    assert 0.13 < low < 0.17 and 0.47 < high < 0.52


def test_ratio_is_shared_with_worker_processes(vocab):
    """The ratio lives in shared memory: a change in the parent reaches persistent workers."""
    from torch.utils.data import DataLoader

    from datamodules.pretraining import IndexedBlocks

    policy = RandomMLMMask()
    policy.ratio = 0.1
    blocks = random_ids(64, 128, vocab).int().numpy()
    loader = DataLoader(
        IndexedBlocks(blocks),
        batch_size=32,
        num_workers=2,
        persistent_workers=True,
        collate_fn=MaskingCollator(policy, vocab, 0),
        prefetch_factor=1,
    )
    before = torch.cat([b["masked"] for b in loader]).float().mean().item()
    policy.ratio = 0.6
    after = torch.cat([b["masked"] for b in loader]).float().mean().item()
    assert before < 0.15 and after > 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="mask ratio must be in \\[0, 1\\]"):
        RandomMLMMask().ratio = bad


def test_batch_without_masked_tokens_warns(vocab):
    ids = random_ids(2, 8, vocab)
    policy = RandomMLMMask()
    policy.ratio = 0.0
    with pytest.warns(UserWarning, match="masked no token"):
        batch = MaskingCollator(policy, vocab, 0)([(0, ids[0]), (1, ids[1])])
    assert (batch["labels"] == IGNORE_INDEX).all()
