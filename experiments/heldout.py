"""What the evaluation commands share: a finished model, and held-out text cut into blocks.

A model is a run dir (its `hf_model/` is used) or an `hf_model` folder, loaded offline with
transformers' Auto classes. Held-out text is the built-in corpus' validation split, or a text
file / folder given with `--text`, packed exactly as the datamodule packs training text.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from datamodules.corpus import BuiltinCorpus
from datamodules.errors import DataError
from datamodules.masking import Vocab
from datamodules.packing import pack, tokenize
from datamodules.sources import load_text_files, text_files
from datamodules.tokenizer import vocab_of


@dataclass
class LoadedModel:
    model: PreTrainedModel  # in eval mode, on the CPU
    tokenizer: PreTrainedTokenizerBase
    vocab: Vocab
    objective: str  # "causal" or "mlm"
    path: Path  # the hf_model folder
    run_config: dict  # the run's config.yaml, {} for a bare hf_model folder

    @property
    def block_size(self) -> int | None:
        """The sequence length the model was trained on, when its run says."""
        data = self.run_config.get("data", {})
        return data.get("init_args", data).get("block_size")


def model_dir(path: str) -> Path:
    """The hf_model folder behind a run dir or an hf_model folder."""
    root = Path(path)
    for candidate in (root / "hf_model", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise DataError(f"{path!r} is neither a run dir with an hf_model/ folder nor an hf_model folder (no config.json)")


def load_model(path: str) -> LoadedModel:
    folder = model_dir(path)
    architectures = AutoConfig.from_pretrained(folder, local_files_only=True).architectures or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        objective, auto_class = "causal", AutoModelForCausalLM
    elif any(a.endswith("ForMaskedLM") for a in architectures):
        objective, auto_class = "mlm", AutoModelForMaskedLM
    else:
        raise DataError(f"{folder}: architectures {architectures} are neither a causal nor a masked language model")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    run_config_file = folder.parent / "config.yaml"
    run_config = yaml.safe_load(run_config_file.read_text()) if run_config_file.is_file() else {}
    model = auto_class.from_pretrained(folder, local_files_only=True).eval()
    return LoadedModel(model, tokenizer, vocab_of(tokenizer), objective, folder, run_config or {})


def heldout_texts(text: str | None, seed: int, documents: int) -> list[str]:
    """`--text` (a file or folder), or `documents` documents of the built-in validation split."""
    if text:
        return list(load_text_files(text_files(text, "--text"), "--text")["text"])
    return BuiltinCorpus(seed).documents(documents, "validation")


def heldout_blocks(texts: list[str], loaded: LoadedModel, block_size: int, max_blocks: int) -> torch.Tensor:
    """[N, block_size] long: `<bos> doc <eos>` packed and cut like the training data."""
    tokenized = tokenize(Dataset.from_dict({"text": texts}), loaded.tokenizer)
    blocks = pack(tokenized, loaded.vocab.bos_id, loaded.vocab.eos_id, block_size)[:max_blocks]
    if len(blocks) == 0:
        raise DataError(f"the held-out text is shorter than one block of {block_size} tokens")
    return torch.from_numpy(blocks).long()


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", help="held-out text file or folder (.txt, .txt.gz); default: built-in validation split")
    parser.add_argument("--documents", type=int, default=200, help="built-in validation documents to generate (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus (default 0, as in training)")
    parser.add_argument("--block-size", type=int, help="tokens per block; default: the run's data.block_size, else 128")
    parser.add_argument("--max-blocks", type=int, default=64, help="analyse at most this many blocks (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per forward pass (default 16)")
