"""Fine-tuning policies: plain SFT, and MEAP fine-tuning (Zhuang et al. 2025, arXiv 2502.07490).

A fine-tuning policy receives an `SFTBlock` — a batch of (prompt, answer) samples, right-padded,
with the answer marked — and returns the usual batch (`input_ids`, `labels`, `attention_mask`,
`masked`). Labels follow the causal convention of every masklab decoder: aligned with
`input_ids`, -100 = no loss; the module shifts them, so the label at position t is predicted by
the output at t-1.

MEAP fine-tuning duplicates a sample whose answer is longer than `min_answer_tokens`, hides
`ratio` (`data.mask_ratio`) of the copy's tokens behind [MASK] and trains on the copy too. The paper's text and the
released code (scitix/MEAP, MEAP-SFT.py) differ; each difference is a key (defaults = paper):

=================  ==========================================  ===========================================
key                paper text (default)                        released code
=================  ==========================================  ===========================================
layout             ``concat``: original + copy in one row      ``separate_rows``: the copy is its own row
mask_span          ``whole_copy``: any regular token           ``answer``: answer tokens only
copy_loss          ``answer_and_masked``: the copy's answer    ``masked_only``: the masked positions only
                   and its masked tokens
redraw             ``per_step``: a new mask every batch        ``once``: drawn once per sample
=================  ==========================================  ===========================================

Both draw exactly ``max(1, floor(ratio · eligible))`` positions per copy (0 when ratio = 0),
never BOS/EOS/padding. The original part always carries loss on its answer (and closing EOS) only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from core.errors import ConfigError
from datamodules.collate import batch_generator
from datamodules.masking import IGNORE_INDEX, Policy, Vocab

Layout = Literal["concat", "separate_rows"]
CopyLoss = Literal["masked_only", "answer_and_masked"]
MaskSpan = Literal["answer", "whole_copy"]
Redraw = Literal["per_step", "once"]
KEY = "data.masking.init_args"


@dataclass
class SFTBlock:
    """A batch of fine-tuning samples, `<bos> prompt answer <eos>`, right-padded, before masking."""

    input_ids: Tensor  # [B, L] long
    answer_mask: Tensor  # [B, L] bool: answer tokens and the closing EOS (what plain SFT trains on)
    attention_mask: Tensor  # [B, L] long, 1 = real token
    indices: Tensor  # [B] long: dataset index of each sample (seeds masks drawn once per sample)
    seed: int  # the datamodule's seed
    max_length: int  # longest row a policy may build (data.block_size)
    vocab: Vocab

    @property
    def special(self) -> Tensor:
        return self.vocab.is_special[self.input_ids]  # [B, L] bool

    @property
    def answer_tokens(self) -> Tensor:
        """[B] long: regular answer tokens per sample (the closing EOS does not count)."""
        return (self.answer_mask & ~self.special).sum(1)


class FineTunePolicy(Policy, ABC):
    """Base of the fine-tuning policies: an `SFTBlock` in, a batch with causal labels out,
    validated by plain SFT (the same task for every policy, so `val/loss` is the answer loss and
    compares across policies). It shares `Policy`'s declarations and ratio with the pre-training
    policies, not their `TokenBlock` protocol."""

    objective = "causal"

    @abstractmethod
    def __call__(self, block: SFTBlock, generator: torch.Generator) -> dict[str, Tensor]:
        """Build the rows of `block`; returns input_ids, labels, attention_mask, masked."""

    def copy_plan(self, lengths: Tensor, answer_tokens: Tensor, max_length: int) -> tuple[Tensor, Tensor]:
        """Which samples qualify for a masked copy, and which of those have room for it.

        Args: lengths [N] and answer_tokens [N] of the samples; max_length the row limit.
        Returns two [N] bool tensors. The datamodule counts them once at setup (to report copies
        dropped for lack of room); `__call__` uses the same rule per batch."""
        none = torch.zeros_like(lengths, dtype=torch.bool)
        return none, none

    def validation_policy(self) -> FineTunePolicy:
        return PlainSFT()


class PlainSFT(FineTunePolicy):
    """Supervised fine-tuning baseline: loss on the answer (and its closing EOS) only, no copy."""

    default_ratio = None
    needs_mask_token = False

    @property
    def loss_targets(self) -> str:
        return "the answer tokens"

    def __call__(self, block: SFTBlock, generator: torch.Generator) -> dict[str, Tensor]:
        ids = block.input_ids
        return {
            "input_ids": ids,
            "labels": torch.where(block.answer_mask, ids, IGNORE_INDEX),
            "attention_mask": block.attention_mask,
            "masked": torch.zeros_like(ids, dtype=torch.bool),
        }


def _check_choice(errors: list[str], key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        errors.append(f"{KEY}.{key} must be one of {', '.join(choices)}; got {value!r}")


class MEAPSFT(FineTunePolicy):
    """MEAP fine-tuning: a masked copy of every sample whose answer is long enough. Its ratio
    (`data.mask_ratio`, default 0.10 as in the paper and the code) is the share of the copy's
    eligible tokens replaced by [MASK].

    Args:
        min_answer_tokens: a sample gets a copy only if its answer has *more* than this many
            tokens (strict, as in the code's ``len(target_ids) > 50``); others train as plain SFT.
        layout: ``concat`` puts the copy after the original in the same row (the row must hold
            twice the sample, within data.block_size, or the copy is dropped and counted);
            ``separate_rows`` makes the copy a row of its own (the batch grows by the copies).
        copy_loss: ``answer_and_masked`` trains the copy on its answer (next-token prediction on
            the masked input) and on its masked tokens; ``masked_only`` only on the masked tokens.
        mask_span: ``whole_copy`` draws the masked positions among all regular tokens of the copy
            (prompt included); ``answer`` among its answer tokens only.
        redraw: ``per_step`` draws a new mask for every batch; ``once`` fixes each sample's mask
            for the whole run (a generator seeded by the seed and the sample's index), as the code
            draws it once when it prepares the data.
    """

    default_ratio = 0.10

    def __init__(
        self,
        min_answer_tokens: int = 50,
        layout: Layout = "concat",
        copy_loss: CopyLoss = "answer_and_masked",
        mask_span: MaskSpan = "whole_copy",
        redraw: Redraw = "per_step",
    ) -> None:
        super().__init__()
        errors = self.config_errors(min_answer_tokens, layout, copy_loss, mask_span, redraw)
        if errors:
            raise ConfigError(errors)
        self.min_answer_tokens = min_answer_tokens
        self.layout, self.copy_loss, self.mask_span, self.redraw = layout, copy_loss, mask_span, redraw

    @staticmethod
    def config_errors(
        min_answer_tokens=50,
        layout="concat",
        copy_loss="answer_and_masked",
        mask_span="whole_copy",
        redraw="per_step",
    ) -> list[str]:
        """Every problem with these init arguments, each naming its key (empty when valid)."""
        errors = []
        if min_answer_tokens < 0:
            errors.append(f"{KEY}.min_answer_tokens must be >= 0, got {min_answer_tokens}")
        _check_choice(errors, "layout", layout, ("concat", "separate_rows"))
        _check_choice(errors, "copy_loss", copy_loss, ("masked_only", "answer_and_masked"))
        _check_choice(errors, "mask_span", mask_span, ("answer", "whole_copy"))
        _check_choice(errors, "redraw", redraw, ("per_step", "once"))
        return errors

    def copy_plan(self, lengths: Tensor, answer_tokens: Tensor, max_length: int) -> tuple[Tensor, Tensor]:
        qualifies = answer_tokens > self.min_answer_tokens
        fits = torch.full_like(qualifies, True) if self.layout == "separate_rows" else 2 * lengths <= max_length
        return qualifies, qualifies & fits

    def _scores(self, block: SFTBlock, generator: torch.Generator) -> Tensor:
        """[B, L] uniform draws that order the eligible positions."""
        batch, length = block.input_ids.shape
        if self.redraw == "per_step":
            return torch.rand(batch, length, generator=generator)
        # one generator per sample, always max_length draws: the same mask whatever the batch
        rows = [torch.rand(block.max_length, generator=batch_generator(block.seed, [int(i)])) for i in block.indices]
        return torch.stack(rows)[:, :length]

    def choose(self, block: SFTBlock, with_copy: Tensor, generator: torch.Generator) -> Tensor:
        """[B, L] bool: the positions of each sample to mask in its copy, exactly
        max(1, floor(ratio · eligible)) per sample with a copy (0 at ratio 0)."""
        region = block.answer_mask if self.mask_span == "answer" else block.attention_mask.bool()
        eligible = region & ~block.special & with_copy[:, None]  # [B, L]
        count = torch.floor(self.ratio * eligible.sum(1)).long().clamp_min(1 if self.ratio > 0 else 0)  # [B]
        scores = self._scores(block, generator).masked_fill(~eligible, 2.0)  # ineligible rank last
        rank = scores.argsort(1).argsort(1)  # [B, L]: 0 = smallest score
        return eligible & (rank < count[:, None])

    def __call__(self, block: SFTBlock, generator: torch.Generator) -> dict[str, Tensor]:
        ids, answer = block.input_ids, block.answer_mask
        lengths = block.attention_mask.sum(1)  # [B]
        _, with_copy = self.copy_plan(lengths, block.answer_tokens, block.max_length)  # [B]
        masked = self.choose(block, with_copy, generator)  # [B, L], in sample coordinates
        original = {
            "input_ids": ids,
            "labels": torch.where(answer, ids, IGNORE_INDEX),
            "attention_mask": block.attention_mask,
            "masked": torch.zeros_like(masked),
        }
        copy_target = masked if self.copy_loss == "masked_only" else masked | answer
        copy = {
            "input_ids": torch.where(masked, block.vocab.mask_id, ids),
            "labels": torch.where(copy_target, ids, IGNORE_INDEX),
            "attention_mask": block.attention_mask,
            "masked": masked,
        }
        if self.layout == "separate_rows":
            return {name: torch.cat([original[name], copy[name][with_copy]]) for name in original}
        return _concatenate(original, copy, lengths, with_copy, block.vocab.pad_id)

    def __repr__(self) -> str:
        return (
            f"MEAPSFT({self._ratio_repr()}, min_answer_tokens={self.min_answer_tokens}, "
            f"layout={self.layout}, copy_loss={self.copy_loss}, mask_span={self.mask_span}, redraw={self.redraw})"
        )


def _concatenate(
    original: dict[str, Tensor], copy: dict[str, Tensor], lengths: Tensor, with_copy: Tensor, pad_id: int
) -> dict[str, Tensor]:
    """Rows `original[:n] + copy[:n]` (just `original[:n]` where there is no copy), right-padded
    to the longest. Built with one gather per tensor, no loop over samples."""
    total = lengths * (1 + with_copy.long())  # [B]
    position = torch.arange(int(total.max()))[None]  # [1, L2]
    n = lengths[:, None]  # [B, 1]
    in_original = position < n  # [B, L2]
    in_copy = (position >= n) & (position < total[:, None])  # [B, L2]
    source = torch.where(in_original, position, position - n).clamp(0, original["input_ids"].size(1) - 1)  # [B, L2]
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "masked": False}

    def place(name: str) -> Tensor:
        first, second = original[name].gather(1, source), copy[name].gather(1, source)  # [B, L2]
        return torch.where(in_original, first, torch.where(in_copy, second, torch.full_like(second, fill[name])))

    return {
        "input_ids": place("input_ids"),
        "labels": place("labels"),
        "attention_mask": (in_original | in_copy).long(),
        "masked": place("masked"),
    }
