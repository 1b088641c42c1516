"""A finished model to evaluate: a run dir (its `hf_model/` is used) or an `hf_model` folder,
loaded offline with transformers' Auto classes, or a model still in training (the callbacks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.errors import DataError
from datamodules.masking import Vocab
from datamodules.tokenizer import context_length, vocab_of


@dataclass
class LoadedModel:
    model: PreTrainedModel  # in eval mode
    tokenizer: PreTrainedTokenizerBase
    vocab: Vocab
    objective: str  # "causal" or "mlm"
    path: Path | None = None  # the hf_model folder; None for a model still in training
    run_config: dict = field(default_factory=dict)  # the run's config.yaml, {} for a bare hf_model folder

    @property
    def block_size(self) -> int | None:
        """The sequence length the model was trained on, when its run says."""
        data = self.run_config.get("data", {})
        return data.get("init_args", data).get("block_size")

    @property
    def context_length(self) -> int:
        """The longest input the model's position embeddings allow."""
        return context_length(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


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
