import numpy as np
import pytest
import torch

from core.errors import ConfigError, DataError
from datamodules import MEAPInputMask, PretrainingDataModule, RandomMLMMask
from datamodules.masking import IGNORE_INDEX
from datamodules.tokenizer import train_bpe, vocab_of


def make(tmp_path, **kwargs):
    args = dict(builtin_documents=80, vocab_size=400, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    return PretrainingDataModule(**{**args, **kwargs})


def test_builtin_pipeline_gives_masked_batches_and_caches(tmp_path):
    dm = make(tmp_path, masking=RandomMLMMask())
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "masked"}
    assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["masked"])
    assert len(list((tmp_path / "cache" / "blocks").glob("*.npy"))) == 2
    assert dm.tokenizer.mask_token == "<mask>" and len(dm.tokenizer) <= 400
    # a second datamodule reuses the cached tokenizer and blocks, and never builds the text
    again = make(tmp_path, masking=RandomMLMMask())
    again._texts = lambda split: pytest.fail(f"the {split} text was built, but the tokenizer and blocks are cached")
    again.setup("fit")
    np.testing.assert_array_equal(again.train_blocks, dm.train_blocks)


def test_sentence_end_table_marks_full_stops(tmp_path):
    dm = make(tmp_path)
    ids = dm.tokenizer("The cat sleeps. A dog runs!", add_special_tokens=False)["input_ids"]
    ends = [dm.tokenizer.decode([i]).strip() for i in ids if dm.vocab.is_sentence_end[i]]
    assert ends and all(e[-1] in ".!?" for e in ends)
    assert dm.vocab.is_sentence_end[dm.vocab.eos_id]


def test_mlm_validation_masks_are_fixed_and_causal_validation_is_clean(tmp_path):
    first, second = make(tmp_path, masking=RandomMLMMask(), mask_ratio=0.4), make(tmp_path, masking=RandomMLMMask())
    for dm in (first, second):
        dm.setup("fit")
    assert torch.equal(first.val_batches["input_ids"], second.val_batches["input_ids"])
    share = first.val_batches["masked"].float().mean().item()
    assert 0.10 < share < 0.17  # val_mask_ratio=0.15, whatever the training ratio
    labelled = first.val_batches["labels"] != IGNORE_INDEX
    # every scored token is hidden: with BERT's 80/10/10 a model that copies its input scored ~0.1 for free
    assert torch.equal(labelled, first.val_batches["input_ids"] == first.vocab.mask_id)
    meap = make(tmp_path, masking=MEAPInputMask())
    meap.setup("fit")
    assert not meap.val_batches["masked"].any()
    assert torch.equal(meap.val_batches["input_ids"], meap.val_batches["labels"])


def test_folder_of_text_files_trains_like_the_builtin_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        paragraphs = [f"Paragraph {j} of file {i} says the river is wide and slow." * 3 for j in range(20)]
        (folder / f"part{i}.txt").write_text("\n\n".join(paragraphs))
    dm = make(tmp_path, data_path=str(folder), masking=MEAPInputMask())
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "river" in dm.tokenizer.decode(batch["labels"][0])
    assert len(dm.val_batches["input_ids"]) >= 1


def test_each_rank_sees_different_data(tmp_path):
    dm = make(tmp_path)
    dm.setup("fit")
    from datamodules.loading import ResumableSampler
    from datamodules.pretraining import IndexedBlocks

    dataset = IndexedBlocks(dm.train_blocks)
    shards = [set(ResumableSampler(dataset, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert shards[0] and not shards[0] & shards[1]


def test_resumable_sampler_skips_what_was_consumed(tmp_path):
    from datamodules.loading import ResumableSampler

    full = list(ResumableSampler(range(50), num_replicas=1, rank=0, seed=0))
    sampler = ResumableSampler(range(50), num_replicas=1, rank=0, seed=0)
    sampler.skip = 20
    assert list(sampler) == full[20:]
    assert list(sampler) == full  # the skip applies to the resumed epoch only


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match="data.data_path: '/nope/corpus' does not exist"):
        make(tmp_path, data_path="/nope/corpus")


def test_empty_corpus_is_named(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n   \n")
    dm = make(tmp_path, data_path=str(folder))
    with pytest.raises(DataError, match="empty corpus"):
        dm.prepare_data()


def test_every_bad_key_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        make(tmp_path, mask_ratio=1.5, block_size=0, val_fraction=-1)
    assert {"data.mask_ratio", "data.block_size", "data.val_fraction"} <= {e.split()[0] for e in err.value.errors}


def test_tokenizer_without_mask_token_is_refused_for_masking(tmp_path):
    tokenizer = train_bpe(["some text to learn from, again and again."] * 20, 300)
    tokenizer.mask_token = None
    path = tmp_path / "tok"
    tokenizer.save_pretrained(path)
    assert vocab_of(tokenizer).mask_id is None
    dm = make(tmp_path, tokenizer_path=str(path), masking=RandomMLMMask())
    with pytest.raises(DataError, match="has no mask token, but RandomMLMMask needs one"):
        dm.setup("fit")


def test_second_to_last_validates_on_its_own_task(tmp_path):
    from datamodules import SecondToLastSwap

    dm = make(tmp_path, masking=SecondToLastSwap(block_length=4))
    dm.setup("fit")
    labelled = dm.val_batches["labels"] != IGNORE_INDEX
    assert labelled[:, 4::4].all() and labelled.sum() == labelled[:, 4::4].sum()
