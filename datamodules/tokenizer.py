"""Tokenizers: train a byte-level BPE on the training text (cached), or load a local HF one."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from core.errors import DataError
from datamodules.masking import Vocab

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
}
SENTENCE_FINAL = (".", "!", "?")


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with masklab's special tokens (ids 0..6, pad = 0)."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def cached_bpe(
    cache_dir: Path, key: str, texts: Callable[[], Iterable[str]], vocab_size: int
) -> PreTrainedTokenizerBase:
    """Train once per (corpus, vocab size); later runs and other ranks load the saved folder.
    `texts` is called only to train: building the text (13 s for the 8,000-document built-in
    corpus on a busy 2-core machine) would be wasted on every start that finds the tokenizer cached."""
    target = cache_dir / "tokenizers" / key
    if not (target / "tokenizer.json").exists():
        tokenizer = train_bpe(texts(), vocab_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent rank either sees all of it or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return AutoTokenizer.from_pretrained(target)


def framed_like_training(tokenizer: PreTrainedTokenizerBase, objective: str) -> PreTrainedTokenizerBase:
    """A copy whose default framing (`add_special_tokens=True`) is the one documents had in training,
    so `AutoTokenizer.from_pretrained(hf_model)("text")` feeds the model what it learned from:
    `<s> text` for a decoder (an open document it continues), `<s> text </s>` for an encoder; a pair
    as two packed documents. Training packs `<s> doc </s>` with `add_special_tokens=False`, which
    this does not change. A tokenizer without a `tokenizers` backend is returned as it is."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return tokenizer
    vocab = vocab_of(tokenizer)
    bos, eos = tokenizer.convert_ids_to_tokens([vocab.bos_id, vocab.eos_id])
    single, pair = (
        (f"{bos} $A {eos}", f"{bos} $A {eos} {bos} $B:1 {eos}:1")
        if objective == "mlm"
        else (f"{bos} $A", f"{bos} $A {eos} {bos} $B:1")
    )
    framed = copy.deepcopy(tokenizer)
    framed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(bos, vocab.bos_id), (eos, vocab.eos_id)]
    )
    return framed


def context_length(config: PretrainedConfig) -> int:
    """The longest input a model's position embeddings allow (RoBERTa numbers positions from
    pad_token_id + 1, so it has that many fewer)."""
    if config.model_type == "roberta":
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def exported_tokenizer(
    tokenizer: PreTrainedTokenizerBase, objective: str, config: PretrainedConfig
) -> PreTrainedTokenizerBase:
    """The tokenizer a run exports with its model: framed like training (`framed_like_training`),
    padded on the left for a decoder (batched `generate` continues each row's last token, which right
    padding would make a pad) and on the right for an encoder, and limited to the model's real context
    (`model_max_length`; transformers' default of 1e30 lets an over-long input through to fail inside
    the model)."""
    exported = copy.deepcopy(framed_like_training(tokenizer, objective))
    exported.padding_side = "left" if objective == "causal" else "right"
    exported.init_kwargs["padding_side"] = exported.padding_side  # what save_pretrained writes
    exported.model_max_length = context_length(config)
    return exported


def default_to_init_tokenizer(data_args: Any, model_args: Any) -> None:
    """With `model.init_args.init_from` (fine-tuning a pre-trained run) and no
    `data.init_args.tokenizer_path`, the data takes the run's own tokenizer: the one its weights
    were trained with (a BPE trained on the new text would not match them). Set in the config, so
    the run's config.yaml records it."""
    init_from = model_args.get("init_from") if model_args is not None else None
    if not init_from or data_args is None or "tokenizer_path" not in data_args or data_args["tokenizer_path"]:
        return
    exported = Path(init_from) / "hf_model"
    data_args["tokenizer_path"] = str(exported if exported.is_dir() else init_from)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    if not Path(path).is_dir():
        raise DataError(f"data.tokenizer_path: {path!r} is not a folder holding a saved tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"data.tokenizer_path: could not load a tokenizer from {path!r}: {err}") from err


def vocab_of(tokenizer: PreTrainedTokenizerBase) -> Vocab:
    """The per-type tables masking policies need."""
    size = len(tokenizer)
    is_special = torch.zeros(size, dtype=torch.bool)
    is_special[tokenizer.all_special_ids] = True
    surfaces = tokenizer.batch_decode([[i] for i in range(size)])
    is_sentence_end = torch.tensor([s.rstrip().endswith(SENTENCE_FINAL) for s in surfaces]) & ~is_special
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if eos is None or bos is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has neither a bos/cls nor an eos/sep token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    is_sentence_end[eos] = True
    is_word_start = word_starts(tokenizer, surfaces) | is_special
    return Vocab(
        size=size,
        pad_id=pad,
        bos_id=bos,
        eos_id=eos,
        mask_id=tokenizer.mask_token_id,
        is_special=is_special,
        is_sentence_end=is_sentence_end,
        is_word_start=is_word_start,
    )


def word_starts(tokenizer: PreTrainedTokenizerBase, surfaces: list[str]) -> torch.Tensor:
    """[V] bool: which tokens begin a word, for whole-word masking.

    Byte-level BPE (masklab's own tokenizer, GPT-2, RoBERTa) marks a word start with a leading
    space (or newline) in the token's surface form; SentencePiece with a leading "▁" piece;
    WordPiece (BERT) the other way round, with a "##" prefix on every continuation.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(surfaces))))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordPiece":
        return torch.tensor([not str(p).startswith("##") for p in pieces])
    return torch.tensor([s[:1].isspace() or str(p).startswith("▁") for p, s in zip(pieces, surfaces)])
