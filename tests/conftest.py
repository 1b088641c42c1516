"""Tiny fixtures: a hand-made vocabulary, and CLI overrides that shrink any config to seconds."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.common import save_tiny_hf_model
from datamodules.masking import Vocab

# One thread per test process (and per run a test starts): with `pytest -n`, workers that each
# take every core wait for each other, and a busy machine makes that much worse (issue 13).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The accelerator the tiny CLI runs use: "cpu" everywhere but in benchmarks.device_check, which
# sets MASKLAB_TEST_ACCELERATOR=gpu to run tests/test_gpu_path.py's config runs on the GPU.
ACCELERATOR = os.environ.get("MASKLAB_TEST_ACCELERATOR", "cpu")

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4
FULL_STOP = 10  # a regular token that ends sentences
FIRST_CONTINUATION = 40  # ids from here on continue the word before them (like BPE pieces without a space)


def make_vocab(size: int = 64) -> Vocab:
    is_special = torch.zeros(size, dtype=torch.bool)
    is_special[[PAD, BOS, EOS, UNK, MASK]] = True
    is_sentence_end = torch.zeros(size, dtype=torch.bool)
    is_sentence_end[[FULL_STOP, EOS]] = True
    is_word_start = torch.arange(size) < FIRST_CONTINUATION
    return Vocab(size, PAD, BOS, EOS, MASK, is_special, is_sentence_end, is_word_start)


@pytest.fixture
def vocab() -> Vocab:
    return make_vocab()


def random_ids(batch: int, length: int, vocab: Vocab, seed: int = 0) -> torch.Tensor:
    """Regular tokens with a BOS at the start and an EOS at the end of every row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK + 1, vocab.size, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = BOS, EOS
    return ids


TINY = [
    "--data.builtin_documents",
    "120",
    "--data.vocab_size",
    "512",
    "--data.block_size",
    "32",
    "--data.batch_size",
    "4",
    "--model.init_args.hidden_size",
    "32",
    "--model.init_args.num_layers",
    "2",
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.accelerator",
    ACCELERATOR,
]


@pytest.fixture
def tiny_args(tmp_path) -> list[str]:
    """Overrides that make any shipped config train in seconds, writing under tmp_path."""
    return [*TINY, "--runs_dir", str(tmp_path / "runs"), "--data.cache_dir", str(tmp_path / "cache")]


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory):
    """An hf_model folder holding a random tiny Llama (context 256) and its tokenizer."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("causal") / "hf_model", "causal")


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory):
    """An hf_model folder holding a random tiny BERT (context 256) and its tokenizer."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("mlm") / "hf_model", "mlm")
