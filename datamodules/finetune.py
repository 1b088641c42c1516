"""`FineTuneDataModule`: (prompt, answer) pairs -> template -> tokens -> fine-tuning batches.

Samples are ``<bos> template(prompt) template(answer) <eos>``; the answer and its EOS are what
plain SFT trains on. A sample is never packed with others: each batch is right-padded to its
longest sample, and the fine-tuning policy (`PlainSFT`, `MEAPSFT`) builds the rows.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset as HFDataset
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from core.errors import DataError, raise_if_any
from datamodules.collate import batch_generator
from datamodules.loading import (
    Sources,
    TokenizedDataModule,
    adopt_policy,
    check_mask_token,
    common_config_errors,
)
from datamodules.masking import Vocab
from datamodules.policies.finetune import MEAPSFT, FineTunePolicy, PlainSFT, SFTBlock
from datamodules.qa_corpus import QACorpus
from datamodules.recall import RecallConfig, is_recall_vocabulary, recall_options, recall_tokenizer, sft_pairs
from datamodules.sources import files_fingerprint, open_hf_split, stable_hash

TRUNCATIONS = ("prompt_start", "end", "drop")
BUILTIN_VARIANTS = ("qa", "recall")
TEMPLATES = {  # (prompt, answer) per built-in variant: the recall vocabulary has no words for "Answer:"
    "qa": ("{prompt}\nAnswer:", " {answer}"),
    "recall": ("{prompt}", " {answer}"),
}
Pair = tuple[str, str]


def model_folder(path: str) -> Path:
    """A run dir's `hf_model/`, or the folder itself (an HF model or tokenizer folder)."""
    return Path(path) / "hf_model" if (Path(path) / "hf_model").is_dir() else Path(path)


def jsonl_files(path: str, key: str) -> list[Path]:
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".jsonl", ".json"))
    if not files:
        raise DataError(f"{key}: folder {path!r} holds no .jsonl files")
    return files


def _check_pair(prompt: object, answer: object, where: str, fields: tuple[str, str]) -> Pair:
    for name, value in zip(fields, (prompt, answer)):
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not answer.strip():
        raise DataError(f"{where}: the answer (field {fields[1]!r}) is empty")
    return prompt, answer


def read_jsonl(files: list[Path], prompt_field: str, answer_field: str) -> list[Pair]:
    """Every (prompt, answer) pair; a bad line is refused naming its file and line."""
    pairs = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{file} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not a JSON object ({err.msg})") from err
                if not isinstance(record, dict):
                    raise DataError(f"{where}: not a JSON object")
                for name in (prompt_field, answer_field):
                    if name not in record:
                        raise DataError(
                            f"{where}: no {name!r} field (fields: {sorted(record)}); "
                            "set data.prompt_field / data.answer_field"
                        )
                pairs.append(
                    _check_pair(record[prompt_field], record[answer_field], where, (prompt_field, answer_field))
                )
    if not pairs:
        raise DataError(f"{', '.join(map(str, files[:3]))}: no samples")
    return pairs


def read_hf(name: str, config: str | None, split: str, prompt_field: str, answer_field: str) -> list[Pair]:
    """(prompt, answer) pairs from a `datasets` source: a `save_to_disk` folder or a hub id."""
    dataset = open_hf_split(name, config, split)
    missing = [f for f in (prompt_field, answer_field) if f not in dataset.column_names]
    if missing:
        raise DataError(
            f"data.hf_dataset {name!r}: no column {missing[0]!r} (columns: {dataset.column_names}); "
            "set data.prompt_field / data.answer_field"
        )
    fields = (prompt_field, answer_field)
    return [
        _check_pair(p, a, f"{name} split {split!r} row {i}", fields)
        for i, (p, a) in enumerate(zip(dataset[prompt_field], dataset[answer_field]))
    ]


@dataclass
class PreparedSplit:
    """Tokenised samples of one split and what preparing them changed."""

    ids: list[np.ndarray]  # each [n] int64: <bos> prompt answer <eos>
    answer_spans: list[tuple[int, int]]  # [start, end) of the labelled answer (with its EOS unless cut)
    source_samples: int
    events: Counter = field(default_factory=Counter)  # what truncation did, by description

    def summary(self) -> str:
        changes = "; ".join(f"{count} {what}" for what, count in sorted(self.events.items()))
        return f"{len(self.ids)} of {self.source_samples} samples kept" + (f" ({changes})" if changes else "")


def encode(
    pairs: list[Pair],
    tokenizer: PreTrainedTokenizerBase,
    vocab: Vocab,
    prompt_template: str,
    answer_template: str,
    block_size: int,
    truncation: str,
) -> PreparedSplit:
    """Template, tokenise and fit every pair into `block_size`, counting every cut and drop.

    `prompt_start` cuts the start of the prompt (a long-context prompt ends with its question)
    and drops a sample whose answer alone does not fit; `end` cuts the end of the sequence, as
    the reference code does — the answer is cut (counted), and a sample whose prompt fills the
    block (no answer token left) is dropped and counted instead of raising; `drop` drops every
    sample longer than the block.
    """
    # a special token's string in the data ("<s>") is text, as in pre-training (docs/data-and-policies.md)
    as_text = {"add_special_tokens": False, "split_special_tokens": True}
    prompts = tokenizer([prompt_template.replace("{prompt}", p) for p, _ in pairs], **as_text)["input_ids"]
    answers = tokenizer([answer_template.replace("{answer}", a) for _, a in pairs], **as_text)["input_ids"]
    room = block_size - 2  # BOS and EOS
    prepared = PreparedSplit([], [], len(pairs))
    for prompt, answer in zip(prompts, answers):  # a loop over samples, once per run
        eos_labelled = True
        if len(prompt) + len(answer) > room:
            if truncation == "drop":
                prepared.events["dropped: longer than data.block_size (truncation=drop)"] += 1
                continue
            if truncation == "prompt_start":
                if len(answer) > room:
                    prepared.events["dropped: the answer alone is longer than data.block_size"] += 1
                    continue
                prompt = prompt[len(prompt) + len(answer) - room :]
                prepared.events["prompts cut at their start"] += 1
            else:
                if len(prompt) >= room:
                    prepared.events["dropped: the prompt fills data.block_size, no answer token left"] += 1
                    continue
                answer = answer[: room - len(prompt)]
                eos_labelled = False  # the answer goes on: the model must not learn to stop here
                prepared.events["answers cut at their end (truncation=end)"] += 1
        ids = np.array([vocab.bos_id, *prompt, *answer, vocab.eos_id], dtype=np.int64)
        start = 1 + len(prompt)
        prepared.ids.append(ids)
        prepared.answer_spans.append((start, len(ids) if eos_labelled else len(ids) - 1))
    return prepared


class SFTSamples(Dataset):
    """Tokenised samples; each carries its index so masks can be seeded by it."""

    def __init__(self, prepared: PreparedSplit) -> None:
        self.prepared = prepared

    def __len__(self) -> int:
        return len(self.prepared.ids)

    def __getitem__(self, index: int) -> tuple[int, Tensor, int, int]:
        start, end = self.prepared.answer_spans[index]
        return index, torch.from_numpy(self.prepared.ids[index]), start, end


class SFTCollator:
    """Right-pads a batch of samples into an `SFTBlock` and applies the fine-tuning policy."""

    def __init__(self, policy: FineTunePolicy, vocab: Vocab, seed: int, max_length: int) -> None:
        self.policy, self.vocab, self.seed, self.max_length = policy, vocab, seed, max_length

    def block(self, samples: list[tuple[int, Tensor, int, int]]) -> SFTBlock:
        lengths = torch.tensor([len(ids) for _, ids, _, _ in samples])  # [B]
        ids = torch.full((len(samples), int(lengths.max())), self.vocab.pad_id, dtype=torch.long)  # [B, L]
        for row, (_, sample, _, _) in enumerate(samples):
            ids[row, : len(sample)] = sample
        position = torch.arange(ids.size(1))[None]  # [1, L]
        starts = torch.tensor([s for _, _, s, _ in samples])[:, None]  # [B, 1]
        ends = torch.tensor([e for _, _, _, e in samples])[:, None]  # [B, 1]
        return SFTBlock(
            input_ids=ids,
            answer_mask=(position >= starts) & (position < ends),
            attention_mask=(position < lengths[:, None]).long(),
            indices=torch.tensor([i for i, _, _, _ in samples]),
            seed=self.seed,
            max_length=self.max_length,
            vocab=self.vocab,
        )

    def __call__(self, samples: list[tuple[int, Tensor, int, int]]) -> dict[str, Tensor]:
        block = self.block(samples)
        return self.policy(block, batch_generator(self.seed, block.indices.tolist()))


class FineTuneDataModule(TokenizedDataModule):
    """Instruction / long-context fine-tuning data; the policy decides plain SFT or MEAP SFT.

    Args:
        masking: the fine-tuning policy: None = `PlainSFT` (loss on the answer only), or
            `MEAPSFT`.
        mask_ratio: the policy's ratio (`MEAPSFT`: share of the copy's tokens masked), handed to
            the policy; None = its default (`MEAPSFT`: 0.10). `PlainSFT` has none and refuses one.
        data_path: a .jsonl file (one JSON object per line) or a folder of them; None = the
            built-in QA generator (or `hf_dataset`).
        val_data_path: validation .jsonl; None = hold out `val_fraction` of the samples.
        hf_dataset: a `datasets` source instead: hub id or a local `save_to_disk` folder.
        hf_config: the `datasets` config name.
        hf_split: the split to train on.
        hf_val_split: the split to validate on; None = hold out `val_fraction`.
        prompt_field: the field / column holding the prompt.
        answer_field: the field / column holding the answer.
        prompt_template: the text before the answer; ``{prompt}`` is replaced by the prompt.
            None = ``"{prompt}\nAnswer:"`` (``"{prompt}"`` for the recall variant).
        answer_template: the answer's text; ``{answer}`` is replaced by the answer. None = ``" {answer}"``.
        truncation: what to do with a sample longer than `block_size`: ``prompt_start`` (cut the
            start of the prompt, drop a sample whose answer alone does not fit), ``end`` (cut the
            end, i.e. the answer, as the reference code does), ``drop``. Every cut and drop is
            counted and reported.
        builtin_documents: samples the built-in QA generator makes for training (named like the
            pre-training key, so the same command-line overrides work).
        builtin_max_facts: most facts in a built-in key–value context (sets context length).
        builtin_variant: the built-in samples: "qa" (long-context QA and key–value retrieval in
            English) or "recall" (associative recall over ids: the key-value pairs are the prompt,
            the queries with their values the answer; `data.recall` as in pre-training, no filler).
        recall: the recall samples' options (pairs, queries, key/value vocabularies); the vocabulary
            must be the pre-trained run's, so keep its `data.recall` keys.
        val_fraction: share held out for validation when no validation source is given (built-in:
            validation samples = this share of `builtin_documents`, at least 8, from their own stream).
        tokenizer_path: a tokenizer folder, or a run dir / HF model folder (its `hf_model/` is
            used): normally the pre-trained run that `model.init_args.init_from` names. None =
            train a byte-level BPE on the fine-tuning text.
        vocab_size: size of the trained BPE (when there is no `tokenizer_path`).
        block_size: longest row: a sample is fitted into it, and a concatenated MEAP copy must fit too.
        batch_size: samples per batch on each device (MEAP `separate_rows` adds a row per copy).
        num_workers: DataLoader worker processes (masking runs in them).
        pin_memory: DataLoaders hand out batches in page-locked memory; None = when a GPU is available.
        seed: seed of the built-in samples, the split, the shuffling and the masks.
        cache_dir: where trained tokenizers are cached.
    """

    def __init__(
        self,
        masking: FineTunePolicy | None = None,
        mask_ratio: float | None = None,
        data_path: str | None = None,
        val_data_path: str | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        hf_val_split: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        prompt_template: str | None = None,
        answer_template: str | None = None,
        truncation: str = "prompt_start",
        builtin_documents: int = 2000,
        builtin_max_facts: int = 16,
        builtin_variant: str = "qa",
        recall: RecallConfig = RecallConfig(),
        val_fraction: float = 0.05,
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        block_size: int = 1024,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        cache_dir: str = ".cache/masklab",
    ) -> None:
        raise_if_any(self.config_errors(**{k: v for k, v in locals().items() if k not in ("self", "__class__")}))
        sources = Sources(data_path, val_data_path, hf_dataset, hf_config, hf_split, hf_val_split)
        tokenizer = str(model_folder(tokenizer_path)) if tokenizer_path else None
        build = (lambda: recall_tokenizer(recall)) if builtin_variant == "recall" else None
        super().__init__(sources, tokenizer, vocab_size, cache_dir, batch_size, num_workers, pin_memory, seed, build)
        policy = masking if masking is not None else PlainSFT()
        self.policy = adopt_policy(policy, FineTunePolicy, "datamodules.PretrainingDataModule", mask_ratio)
        self.builtin_documents, self.val_fraction, self.block_size = builtin_documents, val_fraction, block_size
        self.prompt_field, self.answer_field = prompt_field, answer_field
        default_prompt, default_answer = TEMPLATES[builtin_variant]
        self.prompt_template = default_prompt if prompt_template is None else prompt_template
        self.answer_template = default_answer if answer_template is None else answer_template
        self.truncation = truncation
        self.builtin_max_facts, self.builtin_variant, self.recall = builtin_max_facts, builtin_variant, recall
        self.prepared: dict[str, PreparedSplit] = {}
        self._pairs: dict[str, list[Pair]] = {}

    @staticmethod
    def config_errors(**args) -> list[str]:
        """Every problem with these init arguments, each naming its key (empty when valid)."""
        errors = common_config_errors(**args)
        if args.get("builtin_max_facts", 16) < 2:
            errors.append(f"data.builtin_max_facts must be >= 2, got {args['builtin_max_facts']}")
        if args.get("truncation", "prompt_start") not in TRUNCATIONS:
            errors.append(f"data.truncation must be one of {', '.join(TRUNCATIONS)}; got {args['truncation']!r}")
        for key, placeholder in (("prompt_template", "{prompt}"), ("answer_template", "{answer}")):
            if args.get(key) is not None and placeholder not in args[key]:
                errors.append(f"data.{key} must contain {placeholder}, got {args[key]!r}")
        errors += _recall_errors(args)
        errors += _policy_errors(args)
        return errors

    # ---- samples -----------------------------------------------------------------------------

    @property
    def source_key(self) -> str:
        sources = self.sources
        if sources.data_path:
            files = jsonl_files(sources.data_path, "data.data_path")
            return stable_hash(
                "sft-files", files_fingerprint(files), sources.val_data_path, self.val_fraction, self.seed
            )
        if sources.hf_dataset:
            return stable_hash("sft-hf", sources.hf_dataset, sources.hf_config, sources.hf_split, sources.hf_val_split)
        if self.builtin_variant == "recall":
            return stable_hash("sft-recall", self.seed, self.builtin_documents, self.recall)
        return stable_hash("sft-builtin", self.seed, self.builtin_documents, self.builtin_max_facts)

    def pairs(self, split: str) -> list[Pair]:
        """The (prompt, answer) pairs of "train" or "validation"."""
        if split not in self._pairs:
            self._pairs[split] = self._load_pairs(split)
        return self._pairs[split]

    def _load_pairs(self, split: str) -> list[Pair]:
        fields = (self.prompt_field, self.answer_field)
        documents = self.builtin_documents
        share = documents if split == "train" else max(8, round(documents * self.val_fraction))
        return self.sources.read(
            split,
            files=lambda path, key: read_jsonl(jsonl_files(path, key), *fields),
            hf=lambda name: read_hf(self.sources.hf_dataset, self.sources.hf_config, name, *fields),
            builtin=lambda: self._builtin_pairs(share, split),
            holdout=lambda pairs: self._holdout(pairs, split),
        )

    def _builtin_pairs(self, count: int, split: str) -> list[Pair]:
        if self.builtin_variant == "recall":
            return sft_pairs(self.recall, count, self.seed, split)
        return [(e.prompt, e.answer) for e in QACorpus(self.seed, self.builtin_max_facts).examples(count, split)]

    def _holdout(self, pairs: list[Pair], split: str) -> list[Pair]:
        if len(pairs) < 2:
            raise DataError(f"data: only {len(pairs)} sample(s); cannot hold out a validation split")
        order = np.random.default_rng(self.seed).permutation(len(pairs))
        held = max(1, round(len(pairs) * self.val_fraction))
        chosen = order[:held] if split == "validation" else order[held:]
        return [pairs[i] for i in sorted(chosen)]

    def _texts(self, split: str) -> HFDataset:
        """The text a new BPE is trained on."""
        return HFDataset.from_dict(
            {
                "text": [
                    self.prompt_template.replace("{prompt}", p) + self.answer_template.replace("{answer}", a)
                    for p, a in self.pairs(split)
                ]
            }
        )

    def prepare(self, split: str) -> PreparedSplit:
        """Tokenise and fit one split, and report what fitting it cut or dropped."""
        prepared = encode(
            self.pairs(split),
            self.tokenizer,
            self.vocab,
            self.prompt_template,
            self.answer_template,
            self.block_size,
            self.truncation,
        )
        if not prepared.ids:
            raise DataError(f"data ({split}): no sample fits data.block_size={self.block_size}: {prepared.summary()}")
        lengths = torch.tensor([len(ids) for ids in prepared.ids])
        answer_tokens = torch.tensor(
            [max(end - start - (end == len(ids)), 0) for ids, (start, end) in zip(prepared.ids, prepared.answer_spans)]
        )
        qualifies, with_copy = self.policy.copy_plan(lengths, answer_tokens, self.block_size)
        if split == "train" and (qualifies & ~with_copy).any():
            prepared.events[
                "MEAP copies dropped: no room for the concatenated copy (raise data.block_size or use "
                "layout: separate_rows); these samples train as plain SFT"
            ] += int((qualifies & ~with_copy).sum())
        if prepared.events:
            rank_zero_warn(f"data ({split}): {prepared.summary()}")
        return prepared

    # ---- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        _ = self.tokenizer  # trains and caches the BPE once, before the ranks start

    def setup(self, stage: str | None = None) -> None:
        check_mask_token(self.policy, self.tokenizer, self.vocab)
        if self.builtin_variant == "recall":
            self._check_recall_vocabulary()
        self.policy.setup(self.vocab)
        self.record_files(jsonl_files)
        for split in ("train", "validation"):
            if split not in self.prepared:
                self.prepared[split] = self.prepare(split)

    def _check_recall_vocabulary(self) -> None:
        """Recall samples are ids of the recall vocabulary of these `data.recall` keys: another tokenizer
        (a BPE pre-trained on text, other key or value counts) would turn them into other tokens silently."""
        if not is_recall_vocabulary(self.tokenizer, self.recall):
            raise DataError(
                f"data.builtin_variant='recall': tokenizer {self.tokenizer.name_or_path!r} is not the recall "
                f"vocabulary of these data.recall keys ({len(self.recall.tokens())} tokens); fine-tune a run "
                "pre-trained on the recall corpus with the same keys, values and filler_tokens"
            )

    def train_dataloader(self) -> DataLoader:
        collate = SFTCollator(self.policy, self.vocab, self.seed, self.block_size)
        return self.loaders.train(SFTSamples(self.prepared["train"]), collate, self.trainer)

    def val_dataloader(self) -> DataLoader:
        collate = SFTCollator(self.policy.validation_policy(), self.vocab, self.seed, self.block_size)
        return self.loaders.validation(SFTSamples(self.prepared["validation"]), self.trainer, collate)


def _recall_errors(args: dict) -> list[str]:
    """The built-in variant and, for recall samples, their options: each sample is `<bos>`, pairs,
    queries and EOS, with no filler, and must fit data.block_size whole."""
    variant = args.get("builtin_variant", "qa")
    if variant not in BUILTIN_VARIANTS:
        return [f"data.builtin_variant must be one of {', '.join(BUILTIN_VARIANTS)}; got {variant!r}"]
    if variant != "recall":
        return []
    recall, errors = recall_options(args)
    if recall.distance:
        errors.append(
            f"data.recall.distance={recall.distance}: fine-tuning samples hold no filler (the pairs are the "
            "prompt, the queries the answer); set it to 0"
        )
        recall = replace(recall, distance=0)
    errors += recall.errors(recall.min_length)
    block_size = args.get("block_size", 1024)
    if not errors and block_size < recall.min_length + 1:
        errors.append(
            f"data.block_size={block_size} is shorter than a recall sample ({recall.min_length + 1} tokens: <bos>, "
            f"{recall.pairs} pairs, {recall.queries} queries, EOS)"
        )
    return errors


def _policy_errors(args: dict) -> list[str]:
    """Check a MEAP policy's keys before it is built. The CLI hands its config over flattened
    (`masking.class_path`, `masking.init_args.layout`); Python callers pass the policy itself."""
    class_path = args.get("masking.class_path", "")
    if str(class_path).rsplit(".", 1)[-1] != MEAPSFT.__name__:
        return []
    prefix = "masking.init_args."
    return MEAPSFT.config_errors(**{k[len(prefix) :]: v for k, v in args.items() if k.startswith(prefix)})
