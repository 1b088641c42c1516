"""The `recall` built-in corpus: multi-query associative recall (MQAR; Arora et al. 2023, "Zoology").

Each sequence is `<bos>`, `pairs` key-value pairs (distinct keys, distinct values), then `queries`
queries, each a key of that sequence's pairs (drawn with replacement, so keys repeat) followed by
the value bound to it. Finding the key in context and copying its value is the ability MEAP claims
to improve, and attention models learn it at widths a CPU trains in minutes, unlike retrieval from
the text corpora. The tokens are ids with their own vocabulary (no BPE): masklab's special tokens
(`[MASK]` among them, never in the data), then keys `k0..`, values `v0..` and filler types `f0..`.

Whatever `block_size` leaves beyond `<bos>`, pairs and queries is filler (uniform or Zipf-distributed
types): `distance` of it sits between the last pair and the first query (every query at least that
far from its pair), the rest spreads at random over the gaps between pairs, between queries and the
end. With `filler: none` nothing may be left over. Sequences are generated vectorised from
(seed, split): the same seed gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from datamodules.tokenizer import SPECIAL_TOKENS

FILLERS = ("none", "uniform", "zipf")
SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class RecallConfig:
    """The recall corpus' options (used when `data.builtin_variant` is `recall`; `block_size` is the sequence length).

    Args:
        pairs: key-value pairs at the start of each sequence.
        queries: queries after the pairs, each a key of the pairs (with replacement) and its value.
        keys: key vocabulary size (at least `pairs`: a sequence's keys are distinct).
        values: value vocabulary size (at least `pairs`: a sequence's values are distinct).
        filler: what fills the tokens left over: "none" (nothing may be left), "uniform" or "zipf".
        filler_tokens: filler vocabulary size.
        distance: filler tokens between the last pair and the first query.
    """

    pairs: int = 8
    queries: int = 24
    keys: int = 64
    values: int = 64
    filler: str = "none"
    filler_tokens: int = 64
    distance: int = 0

    def errors(self, block_size: int, prefix: str = "data.recall") -> list[str]:
        """Every problem with these options at this sequence length, each naming its key."""
        errors = [
            f"{prefix}.{key} must be >= 1, got {getattr(self, key)}"
            for key in ("pairs", "queries", "keys", "values", "filler_tokens")
            if getattr(self, key) < 1
        ]
        if self.distance < 0:
            errors.append(f"{prefix}.distance must be >= 0, got {self.distance}")
        if self.filler not in FILLERS:
            errors.append(f"{prefix}.filler must be one of {list(FILLERS)}, got {self.filler!r}")
        for key in ("keys", "values"):
            if 1 <= getattr(self, key) < self.pairs:
                errors.append(
                    f"{prefix}.pairs={self.pairs} is more than {prefix}.{key}={getattr(self, key)}: "
                    f"a sequence's {key} are distinct"
                )
        if errors:
            return errors
        free = self.free_tokens(block_size)
        needed = block_size - free
        if free < 0:
            errors.append(
                f"data.block_size={block_size} is too short for <bos>, {self.pairs} pairs and {self.queries} queries "
                f"({needed} tokens; {prefix})"
            )
        elif self.distance > free:
            errors.append(
                f"{prefix}.distance={self.distance} cannot be laid out: data.block_size={block_size} leaves {free} "
                f"filler tokens after <bos>, {self.pairs} pairs and {self.queries} queries"
            )
        elif self.filler == "none" and free > 0:
            errors.append(
                f"{prefix}.filler='none' leaves {free} of data.block_size={block_size} tokens empty: set "
                f"data.block_size to {needed} or {prefix}.filler to uniform or zipf"
            )
        return errors

    def free_tokens(self, block_size: int) -> int:
        """Filler tokens per sequence: what `<bos>`, pairs and queries leave of `block_size`."""
        return block_size - self.min_length

    @property
    def min_length(self) -> int:
        """`<bos>`, pairs and queries: a sequence without filler (the length of a fine-tuning sample)."""
        return 1 + 2 * (self.pairs + self.queries)

    @property
    def key_offset(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def value_offset(self) -> int:
        return self.key_offset + self.keys

    @property
    def filler_offset(self) -> int:
        return self.value_offset + self.values

    def tokens(self) -> list[str]:
        """The vocabulary in id order: special tokens, keys, values, filler types."""
        return [
            *SPECIAL_TOKENS.values(),
            *(f"k{i}" for i in range(self.keys)),
            *(f"v{i}" for i in range(self.values)),
            *(f"f{i}" for i in range(self.filler_tokens)),
        ]


def recall_options(args: dict) -> tuple[RecallConfig, list[str]]:
    """A datamodule's recall options from its init arguments (the CLI's early check passes nested keys
    flat: "recall.pairs"), and the error of a data source named beside this built-in corpus."""
    recall = args.get("recall")
    if not isinstance(recall, RecallConfig):
        recall = RecallConfig(**{k[len("recall.") :]: v for k, v in args.items() if k.startswith("recall.")})
    errors = []
    if args.get("data_path") or args.get("hf_dataset"):
        errors.append("data.builtin_variant='recall' is built in: unset data.data_path / data.hf_dataset")
    return recall, errors


def recall_tokenizer(config: RecallConfig) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus' ids (pad = 0 like masklab's BPE); its text is the
    tokens joined by spaces, so an exported model reloads with `AutoTokenizer` and decodes readably."""
    vocab = {token: i for i, token in enumerate(config.tokens())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def is_recall_vocabulary(tokenizer: PreTrainedTokenizerBase, config: RecallConfig) -> bool:
    """Whether `tokenizer` is exactly the vocabulary of these options (another would read the ids as other tokens)."""
    return tokenizer.get_vocab() == {token: i for i, token in enumerate(config.tokens())}


@dataclass
class RecallSequences:
    """Generated sequences and where their answers are; query arrays are [N, queries]."""

    ids: np.ndarray  # [N, L] int64 token ids
    value_position: np.ndarray  # position of each query's value (the answer slot)
    answer: np.ndarray  # the value's token id: the one bound to the query's key
    pair: np.ndarray  # index of the pair the query asks for (0 = first pair)
    distance: np.ndarray  # query key position - its pair's value position
    first: np.ndarray  # bool: the first query of its key in the sequence


def sft_pairs(config: RecallConfig, count: int, seed: int, split: str = "train") -> list[tuple[str, str]]:
    """`count` fine-tuning samples as (prompt, answer) text: the pairs are the prompt, the queries with
    their values the answer, so `<bos> prompt answer` is a recall sequence without filler."""
    sequences = generate(config, config.min_length, count, seed, split)
    tokens = np.array(config.tokens())[sequences.ids[:, 1:]]  # [N, L-1] token strings, <bos> left out
    split_at = 2 * config.pairs
    return [(" ".join(row[:split_at]), " ".join(row[split_at:])) for row in tokens.tolist()]


def generate(
    config: RecallConfig, block_size: int, count: int, seed: int, split: str = "train", bos_id: int = 1
) -> RecallSequences:
    """`count` sequences of `block_size` tokens; (seed, split) fixes them, splits draw disjoint streams."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
    pairs, queries = config.pairs, config.queries
    keys = np.argsort(rng.random((count, config.keys)), axis=1)[:, :pairs] + config.key_offset  # [N, P] distinct
    values = np.argsort(rng.random((count, config.values)), axis=1)[:, :pairs] + config.value_offset
    asked = rng.integers(0, pairs, (count, queries))  # [N, Q] pair index of each query
    units = pairs + queries
    gaps = np.zeros((count, units + 1), dtype=np.int64)  # filler before unit j; the last column is the end
    gaps[:, pairs] = config.distance
    spread = config.free_tokens(block_size) - config.distance
    if spread > 0:
        bins = np.r_[1:pairs, pairs + 1 : units, units]  # between pairs, between queries, at the end
        gaps[:, bins] = rng.multinomial(spread, np.full(len(bins), 1 / len(bins)), size=count)
    starts = 1 + 2 * np.arange(units) + np.cumsum(gaps[:, :units], axis=1)  # [N, P+Q] each unit's key position
    ids = np.zeros((count, block_size), dtype=np.int64)
    if config.filler == "uniform":
        ids[:] = rng.integers(0, config.filler_tokens, (count, block_size)) + config.filler_offset
    elif config.filler == "zipf":
        weights = 1.0 / np.arange(1, config.filler_tokens + 1) ** 1.1
        ids[:] = rng.choice(config.filler_tokens, (count, block_size), p=weights / weights.sum()) + config.filler_offset
    ids[:, 0] = bos_id
    answer = np.take_along_axis(values, asked, axis=1)
    np.put_along_axis(ids, starts, np.concatenate([keys, np.take_along_axis(keys, asked, axis=1)], axis=1), axis=1)
    np.put_along_axis(ids, starts + 1, np.concatenate([values, answer], axis=1), axis=1)
    pair_value = np.take_along_axis(starts[:, :pairs] + 1, asked, axis=1)
    # the first query of each key: a stable sort keeps queries of one key in order, so each key's first
    # in sorted order is its earliest ([N, Q] work, where counting per key would be [N, Q, P])
    order = np.argsort(asked, axis=1, kind="stable")
    in_order = np.take_along_axis(asked, order, axis=1)
    first_in_order = np.ones_like(in_order, dtype=bool)
    first_in_order[:, 1:] = in_order[:, 1:] != in_order[:, :-1]
    first = np.empty_like(first_in_order)
    np.put_along_axis(first, order, first_in_order, axis=1)
    return RecallSequences(ids, starts[:, pairs:] + 1, answer, asked, starts[:, pairs:] - pair_value, first)
