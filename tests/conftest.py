"""Tiny fixtures: a hand-made vocabulary, and CLI overrides that shrink any config to seconds."""

from __future__ import annotations

import pytest
import torch

from datamodules.masking import Vocab

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
    "cpu",
]


@pytest.fixture
def tiny_args(tmp_path) -> list[str]:
    """Overrides that make any shipped config train in seconds, writing under tmp_path."""
    return [*TINY, "--runs_dir", str(tmp_path / "runs"), "--data.cache_dir", str(tmp_path / "cache")]


def save_tiny_hf_model(
    folder, objective: str, max_positions: int = 256, hidden_size: int = 32, num_layers: int = 2, heads: int = 4
):
    """A random transformers model (Llama for "causal", BERT for "mlm"; 2 layers of 32 by default)
    and a small BPE tokenizer trained on the built-in corpus, saved as an `hf_model/` folder.
    Also used by benchmarks/evaluation.py, with a larger shape."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from datamodules.corpus import BuiltinCorpus
    from datamodules.tokenizer import framed_like_training, train_bpe

    torch.manual_seed(0)
    tokenizer = train_bpe(BuiltinCorpus(0).documents(60), vocab_size=300)
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    shape = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": max_positions,
    }
    if objective == "causal":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **ids, **shape))
    else:
        model = AutoModelForMaskedLM.from_config(AutoConfig.for_model("bert", type_vocab_size=1, **ids, **shape))
    model.save_pretrained(folder)
    framed_like_training(tokenizer, objective).save_pretrained(folder)  # as ExportCallback saves it
    return folder


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory):
    """An hf_model folder holding a random tiny Llama (context 256) and its tokenizer."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("causal") / "hf_model", "causal")


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory):
    """An hf_model folder holding a random tiny BERT (context 256) and its tokenizer."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("mlm") / "hf_model", "mlm")
