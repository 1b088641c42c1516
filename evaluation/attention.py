"""Attention analysis of MEAP (Zhuang et al. 2025, arXiv 2502.07490): what masking the input
does to where a model looks.

The same probe batch is run twice, once clean and once with a fixed random share of its regular
tokens replaced by [MASK] (same positions, same model). Two statistics compare the runs:

* `masked_score_decay`: how much less attention the other positions pay to the masked positions;
* `variance_increase`: how much more the attention over the unmasked positions varies, i.e. how
  much sharper the model focuses on what is left.

The paper reports ~53% decay and ~7.8% variance increase at 4k context. A retrieval probe (facts,
one of them asked for again) gives the share of the question's attention that lands on the gold
fact, the context around it and the question itself.

The statistics are pure functions of attention probabilities, shared by the `attention` suite of
`python -m experiments.evaluate` and `AttentionProbeCallback` (during training). SDPA returns no
attention weights, so the probe switches the model to eager attention and back (`eager_attention`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from transformers import PreTrainedModel

from core.errors import ConfigError, DataError, raise_if_any
from datamodules.corpus import ATTRIBUTES, BuiltinCorpus
from datamodules.masking import Vocab
from evaluation.heldout import heldout_blocks, heldout_texts
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult

SEGMENTS = ("context_before", "answer", "context_after", "query", "other")  # segment ids 0..4
OTHER = SEGMENTS.index("other")
Attention = Tensor | Sequence[Tensor]  # [layers, B, H, L, L], or one [B, H, L, L] per layer


@dataclass
class Options:
    """Options of the attention suite.

    Args:
        text: held-out text file or folder (.txt, .txt.gz) for the probe batch; None = the
            built-in corpus' validation split.
        blocks: held-out blocks in the probe batch.
        block_size: tokens per probe block; None = min(128, the model's context length).
        mask_ratio: share of the probe's regular tokens replaced by [MASK] in the masked run.
        prompts: retrieval prompts for the attention shares by segment.
        facts: facts per retrieval prompt (each after one filler sentence); the gold fact is the
            middle one.
        seed: seed of the built-in corpus (0, as in training), of the mask and of the prompts.
    """

    text: str | None = None
    blocks: int = 8
    block_size: int | None = None
    mask_ratio: float = 0.15
    prompts: int = 8
    facts: int = 3
    seed: int = 0


@dataclass
class Change:
    """A statistic in the clean and the masked run, and its relative change, overall and per layer."""

    clean: float
    masked: float
    relative: float  # decay: (clean - masked) / clean; increase: (masked - clean) / clean
    per_layer: list[float]  # the relative change of each layer, first layer first


# ---- statistics on attention probabilities ----------------------------------------------------


def available_keys(valid: Tensor, causal: bool) -> Tensor:
    """[B, L, L] bool: key k is available to query q (both real tokens; k <= q when causal)."""
    pairs = valid[:, :, None] & valid[:, None, :]  # [B, Lq, Lk]
    return pairs.tril() if causal else pairs


def layer_means(attn: Attention, statistic: Callable[[Tensor], Tensor], rows: Tensor) -> Tensor:
    """[layers]: the mean of `statistic(layer)` [B, H, L] over the batch, heads and the query `rows`
    [B, L], layer by layer (so only one layer's float copy is in memory at a time)."""
    weight = rows[:, None, :].float()  # [B, 1, L]
    return torch.stack([(statistic(layer.float()) * weight).sum() / (rows.sum() * layer.shape[1]) for layer in attn])


def _change(clean: Tensor, masked: Tensor, sign: float) -> Change:
    """Relative change of per-layer means [layers]; overall means weigh every layer equally."""
    a, b = clean.mean(), masked.mean()
    return Change(a.item(), b.item(), (sign * (b - a) / a).item(), (sign * (masked - clean) / clean).tolist())


def key_mass(attn: Tensor, keys: Tensor) -> Tensor:
    """[B, H, L]: attention each query of `attn` [B, H, L, L] pays to its `keys` [B, L, L]."""
    return torch.einsum("bhqk,bqk->bhq", attn, keys.to(attn.dtype))


def masked_score_decay(
    clean: Attention, masked: Attention, is_masked: Tensor, valid: Tensor, causal: bool = True
) -> Change:
    """Relative drop of the attention other positions pay to the masked positions.

    For query q, keys M_q = masked positions k != q available to q; its masked score is
    s_q = sum_{k in M_q} A[q, k]. Averaged over layers, heads, batch and every real query with
    M_q non-empty: a (clean run) and b (masked run); decay = (a - b) / a.
    `is_masked`, `valid`: [B, L] bool (masked positions, real tokens).
    """
    keys = available_keys(valid, causal) & is_masked[:, None, :]  # [B, L, L]
    keys &= ~torch.eye(keys.shape[-1], dtype=torch.bool, device=keys.device)
    rows = keys.any(-1)  # [B, L]
    a = layer_means(clean, lambda layer: key_mass(layer, keys), rows)
    b = layer_means(masked, lambda layer: key_mass(layer, keys), rows)
    return _change(a, b, -1.0)


def key_variance(attn: Tensor, keys: Tensor) -> Tensor:
    """[B, H, L]: population variance of the attention weights `attn` [B, H, L, L] of each query
    over its `keys` [B, L, L] (0 for a query with no key)."""
    keys = keys[:, None].to(attn.dtype)  # [B, 1, L, L]
    count = keys.sum(-1).clamp_min(1)
    mean = (attn * keys).sum(-1) / count  # [B, H, L]
    return ((attn - mean[..., None]) ** 2 * keys).sum(-1) / count


def variance_increase(
    clean: Attention, masked: Attention, is_masked: Tensor, valid: Tensor, causal: bool = True
) -> Change:
    """Relative increase of the variance of the attention weights over the unmasked positions.

    For query q, keys U_q = unmasked positions available to q (q itself included when unmasked);
    v_q = (1/|U_q|) sum_{k in U_q} (A[q, k] - mean_{U_q} A[q, .])^2. Averaged over layers, heads,
    batch and every real query with |U_q| >= 2: v_clean and v_masked;
    increase = (v_masked - v_clean) / v_clean.
    """
    keys = available_keys(valid, causal) & ~is_masked[:, None, :]  # [B, L, L]
    rows = keys.sum(-1) >= 2  # [B, L]
    a = layer_means(clean, lambda layer: key_variance(layer, keys), rows)
    b = layer_means(masked, lambda layer: key_variance(layer, keys), rows)
    return _change(a, b, 1.0)


def segment_shares(
    attn: Attention, segments: Tensor, query_rows: Tensor, names: Sequence[str] = SEGMENTS
) -> dict[str, float]:
    """Share of the attention of the `query_rows` [B, L] bool that lands on each segment.

    share_s = mean over layers, heads and query rows q of sum_{k: segments[k] = s} A[q, k];
    `segments` [B, L] long holds each position's index into `names`. Shares sum to 1.
    """
    onehot = torch.nn.functional.one_hot(segments, len(names)).float()  # [B, L, S]
    rows = query_rows.float()  # [B, L]
    per_layer = torch.stack(
        [torch.einsum("bhqk,bq,bks->s", layer.float(), rows, onehot) / (rows.sum() * layer.shape[1]) for layer in attn]
    )
    return dict(zip(names, per_layer.mean(0).tolist()))


# ---- getting attention weights ------------------------------------------------------------------


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """The model with eager attention (the only kind that returns weights), restored afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        if model.config._attn_implementation != "eager":
            raise DataError(
                f"{type(model).__name__} cannot switch to eager attention, so it returns no attention weights"
            )
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def attention_probs(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
    """The attention probabilities of `input_ids` [B, L], one [B, H, L, L] per layer (model in eval mode)."""
    with eager_attention(model):
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    return output.attentions


def probe_mask(input_ids: Tensor, vocab: Vocab, ratio: float, seed: int) -> Tensor:
    """[B, L] bool: a fixed-seed Bernoulli(`ratio`) choice of the regular tokens of `input_ids`."""
    draw = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(seed)).to(input_ids.device)
    return (draw < ratio) & ~vocab.is_special.to(input_ids.device)[input_ids]


def compare_runs(
    model: PreTrainedModel, vocab: Vocab, input_ids: Tensor, is_masked: Tensor, causal: bool
) -> tuple[Change, Change]:
    """Masked-score decay and variance increase of `input_ids` [B, L] against its copy with the
    `is_masked` [B, L] positions replaced by [MASK]."""
    if vocab.mask_id is None:
        raise DataError("the tokenizer has no mask token, so the masked run of the attention probe cannot be built")
    if not is_masked.any():
        raise DataError("the attention probe's mask hides no token; raise mask_ratio or use more blocks")
    valid = input_ids != vocab.pad_id  # [B, L]
    attention_mask = valid.long()
    clean = attention_probs(model, input_ids, attention_mask)
    masked = attention_probs(model, input_ids.masked_fill(is_masked, vocab.mask_id), attention_mask)
    return (
        masked_score_decay(clean, masked, is_masked, valid, causal),
        variance_increase(clean, masked, is_masked, valid, causal),
    )


# ---- the retrieval probe ------------------------------------------------------------------------


def retrieval_texts(world: BuiltinCorpus, rng: np.random.Generator, facts: int) -> list[str]:
    """One retrieval prompt as its segments' texts, in the order of `SEGMENTS[:4]`: filler sentences
    and facts ("The code of Velora is 4812.") before the gold fact, the gold fact, the rest, and the
    question in the training corpus' recall form ("Recall: the code of Velora is")."""
    names = rng.choice(world.names, size=facts, replace=False)
    attribute = str(rng.choice(ATTRIBUTES))
    values = rng.integers(1000, 10000, size=facts)
    stated = [f"The {attribute} of {name} is {value}." for name, value in zip(names, values)]
    fillers = [world.sentence(rng) for _ in stated]  # one before each fact
    gold = facts // 2
    before = " ".join([*(f"{filler} {fact}" for filler, fact in zip(fillers[:gold], stated[:gold])), fillers[gold]])
    after = "".join(f" {filler} {fact}" for filler, fact in zip(fillers[gold + 1 :], stated[gold + 1 :]))
    return [before, f" {stated[gold]}", after, f" Recall: the {attribute} of {names[gold]} is"]


def tokenize_segments(loaded: LoadedModel, pieces: list[str]) -> tuple[Tensor, Tensor]:
    """`<bos>` + the tokens of the concatenated `pieces`: ids [L] and segment ids [L] (BOS: other).
    Each token belongs to the piece its first character is in."""
    text = "".join(pieces)
    encoded = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = torch.tensor([start for start, _ in encoded["offset_mapping"]])  # [L - 1]
    bounds = torch.tensor(np.cumsum([len(p) for p in pieces])[:-1])  # piece i spans [bounds[i-1], bounds[i])
    segments = torch.bucketize(starts, bounds, right=True)
    ids = torch.tensor([loaded.vocab.bos_id, *encoded["input_ids"]])
    return ids, torch.cat([torch.tensor([OTHER]), segments])


def retrieval_batch(loaded: LoadedModel, options: Options) -> tuple[Tensor, Tensor]:
    """`options.prompts` retrieval prompts, right-padded: ids [B, L] and segment ids [B, L] (padding: other)."""
    if not loaded.tokenizer.is_fast:
        raise DataError("the attention suite needs a fast tokenizer (character offsets) for its retrieval probe")
    world, rng = BuiltinCorpus(options.seed), np.random.default_rng([options.seed, 2502])
    rows = [tokenize_segments(loaded, retrieval_texts(world, rng, options.facts)) for _ in range(options.prompts)]
    length = max(len(ids) for ids, _ in rows)
    if length > loaded.context_length:
        raise ConfigError(
            f"attention.facts={options.facts} makes retrieval prompts of {length} tokens, "
            f"longer than the model's {loaded.context_length} positions"
        )
    ids = torch.full((len(rows), length), loaded.vocab.pad_id)
    segments = torch.full((len(rows), length), OTHER)
    for row, (row_ids, row_segments) in enumerate(rows):
        ids[row, : len(row_ids)], segments[row, : len(row_ids)] = row_ids, row_segments
    return ids, segments


# ---- the suite ----------------------------------------------------------------------------------


def option_errors(options: Options, context_length: int) -> list[str]:
    """Every problem with the options, each naming its key (empty when valid)."""
    errors = [
        f"attention.{key} must be >= 1, got {getattr(options, key)}"
        for key in ("blocks", "prompts", "facts")
        if getattr(options, key) < 1
    ]
    if not 0.0 < options.mask_ratio < 1.0:
        errors.append(f"attention.mask_ratio must be in (0, 1), got {options.mask_ratio}")
    if options.block_size is not None and not 2 <= options.block_size <= context_length:
        errors.append(
            f"attention.block_size must be in [2, {context_length}] (the model's positions), got {options.block_size}"
        )
    return errors


def probe_blocks(loaded: LoadedModel, options: Options) -> Tensor:
    """[blocks, block_size] held-out blocks; a built-in document holds well over 64 tokens."""
    block_size = options.block_size or min(128, loaded.context_length)
    texts = heldout_texts(options.text, options.seed, 1 + options.blocks * block_size // 64)
    return heldout_blocks(texts, loaded, block_size, options.blocks)


def segments_figure(shares: dict[str, float]) -> Figure:
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.bar(list(shares), list(shares.values()))
    axes.set_ylabel("share of the query's attention")
    axes.set_title("Retrieval probe: attention from the query, by segment")
    figure.tight_layout()
    return figure


def per_layer_figure(decay: Change, variance: Change) -> Figure:
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    layers = range(1, len(decay.per_layer) + 1)
    axes.plot(layers, decay.per_layer, marker="o", label="masked score decay")
    axes.plot(layers, variance.per_layer, marker="o", label="variance increase")
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.set_xticks(layers)
    axes.set_xlabel("layer")
    axes.set_ylabel("relative change, masked vs clean")
    axes.legend()
    figure.tight_layout()
    return figure


def markdown_table(metrics: dict[str, float]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    return "\n".join([*lines, *(f"| {name} | {value:.4f} |" for name, value in metrics.items())])


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes, so a study can check its metric names before training."""
    return ["masked_score_decay", "variance_increase", *(f"share_{name}" for name in SEGMENTS)]


def run(model: LoadedModel, options: Options) -> SuiteResult:
    """Masked-score decay and variance increase on held-out blocks, and the retrieval probe's shares."""
    raise_if_any(option_errors(options, model.context_length))
    ids, segments = retrieval_batch(model, options)  # [P, L'] each; first, as it checks the prompts fit
    ids, segments = ids.to(model.device), segments.to(model.device)
    blocks = probe_blocks(model, options).to(model.device)  # [N, L]
    is_masked = probe_mask(blocks, model.vocab, options.mask_ratio, options.seed)
    decay, variance = compare_runs(model.model, model.vocab, blocks, is_masked, model.objective == "causal")
    attn = attention_probs(model.model, ids, (ids != model.vocab.pad_id).long())
    shares = segment_shares(attn, segments, segments == SEGMENTS.index("query"))

    metrics = {
        "masked_score_decay": decay.relative,
        "variance_increase": variance.relative,
        **{f"share_{name}": value for name, value in shares.items()},
    }
    details = {
        "masked_score": vars(decay),
        "unmasked_variance": vars(variance),
        "probe": {"blocks": blocks.shape[0], "block_size": blocks.shape[1], "masked_tokens": int(is_masked.sum())},
        "retrieval": {"prompts": ids.shape[0], "max_tokens": ids.shape[1], "facts": options.facts},
    }
    figures = {"segments": segments_figure(shares), "per_layer": per_layer_figure(decay, variance)}
    return SuiteResult(metrics, figures, markdown_table(metrics), details)
