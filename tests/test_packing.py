import numpy as np
from datasets import Dataset

from datamodules.packing import pack


def test_documents_are_framed_by_bos_eos_and_cut_into_blocks():
    tokenized = Dataset.from_dict({"input_ids": [[10, 11, 12], [20], [30, 31, 32, 33]]})
    blocks = pack(tokenized, bos_id=1, eos_id=2, block_size=4)
    stream = [1, 10, 11, 12, 2, 1, 20, 2, 1, 30, 31, 32, 33, 2]
    np.testing.assert_array_equal(blocks, np.array(stream[:12]).reshape(3, 4))
    assert blocks.dtype == np.int32


def test_too_little_text_gives_no_block():
    assert pack(Dataset.from_dict({"input_ids": [[5, 6]]}), 1, 2, block_size=8).shape == (0, 8)
