"""second_to_last: second-to-last vs next-token accuracy, and generate-then-refine decoding (arXiv 2411.15661).

On held-out blocks, with l the swap period of the second-to-last (STL) model (p = l-1, 2l-1, ...
are the swap positions, n = l, 2l, ... the refined ones):

* second-to-last accuracy: the STL model at every swap position p predicts t(p) having seen
  t0 .. t(p-1) and t(p+1); next-token accuracy: the next-token (NTP) model predicts the same t(p)
  from t0 .. t(p-1) (and, for reference, every token of the block).
* refinement: at each n the NTP model proposes its top-k next tokens for t(n); each candidate c
  is put in the place of t(n) in the STL model's (swapped) input, and if the STL model then
  recovers the true last context token t(n-1), c gets a bonus. Reported: top-1 next-token
  accuracy with and without refinement, and the gain.

The suite runs on the STL model, with the NTP run of the same data and size as `ntp`. Without
`ntp` the evaluated model is itself the NTP model, scored on the same targets: its `acc` and
`top1_acc` are then the next-token numbers, so a study compares the two arms on `acc`
(second-to-last vs next-token) and `top1_acc` (refined vs plain: the gain), paired by seed.

The bonus: the paper's released code multiplies the candidate's *logit* by 1 + w (w = 0.05),
which lowers a negative logit, turning the bonus into a penalty, and depends on the arbitrary
offset of the logits. masklab's default adds log(1 + w) to the candidate's *log-probability*
(multiplies its probability by 1 + w), which is always a bonus; `bonus: logit` reproduces the
reference.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from core.errors import DataError
from datamodules.policies.swap import SecondToLastSwap, swap_pairs, swap_positions
from evaluation.heldout import heldout_blocks, heldout_texts
from evaluation.model import LoadedModel, load_model
from evaluation.result import SuiteResult


@dataclass
class Options:
    """The partner model, the refinement, and the held-out text.

    Args:
        ntp: the next-token run (run dir or hf_model folder, same data and size) that the evaluated
            second-to-last model is compared with and refines; None = the evaluated model is the
            next-token model itself. In a study: `${ARM}` in the arm's evaluate_args.
        block_length: swap period l; None = the STL run's `data.masking.init_args.block_length`, else 4.
        top_k: next-token candidates to refine (15, as the paper).
        w: refinement bonus weight (0.05, as the paper).
        bonus: "logprob": + log(1 + w) to the candidate's log-probability; "logit": logit × (1 + w),
            the reference code.
        text: held-out text file or folder; None = the built-in corpus' validation split.
        documents: built-in validation documents to generate when `text` is None.
        seed: seed of the built-in corpus (0, as in training).
        block_size: tokens per block; None = the run's data.block_size, else 128.
        max_blocks: score at most this many blocks.
        batch_size: blocks per forward pass.
    """

    ntp: str | None = None
    block_length: int | None = None
    top_k: int = 15
    w: float = 0.05
    bonus: Literal["logprob", "logit"] = "logprob"
    text: str | None = None
    documents: int = 200
    seed: int = 0
    block_size: int | None = None
    max_blocks: int = 64
    batch_size: int = 16


def refine_scores(logits: Tensor, candidates: Tensor, recovered: Tensor, w: float, bonus: str = "logprob") -> Tensor:
    """[N, K] scores of the NTP candidates [N, K] (ids) given the NTP logits [N, V] and whether
    each candidate let the STL model recover the last context token ([N, K] bool).

    bonus="logprob": log p(c) + log(1 + w) if recovered; bonus="logit": logit(c) * (1 + w) if
    recovered, as the reference code does.
    """
    if bonus == "logit":
        return logits.gather(1, candidates) * (1 + w * recovered.float())
    if bonus == "logprob":
        return torch.log_softmax(logits.float(), -1).gather(1, candidates) + math.log1p(w) * recovered.float()
    raise ValueError(f"bonus must be 'logprob' or 'logit', got {bonus!r}")


def refine(logits: Tensor, candidates: Tensor, recovered: Tensor, w: float, bonus: str = "logprob") -> Tensor:
    """[N] the refined choice among the candidates."""
    best = refine_scores(logits, candidates, recovered, w, bonus).argmax(1, keepdim=True)  # [N, 1]
    return candidates.gather(1, best).squeeze(1)


@torch.no_grad()
def batched(loaded: LoadedModel, ids: Tensor, batch_size: int, keep: Callable[[Tensor], Tensor]) -> Tensor:
    """`keep(logits)` of every `batch_size` rows of `ids`, concatenated: only what is kept of the
    [rows, L, V] logits stays in memory."""
    device = loaded.device
    return torch.cat(
        [
            keep(loaded.model(input_ids=ids[i : i + batch_size].to(device)).logits.float()).cpu()
            for i in range(0, len(ids), batch_size)
        ]
    )


def next_token_scores(ntp: LoadedModel, blocks: Tensor, block_length: int, top_k: int, batch_size: int) -> dict:
    """The NTP model alone: its accuracy on the swap targets t(p) and on every token, and its
    top-1 and top-k at the refined positions n."""
    p = swap_positions(blocks.shape[1], block_length)  # [P]; n - 1 = p for n = l, 2l, ...
    predicted = batched(ntp, blocks, batch_size, lambda logits: logits.argmax(-1))  # [N, L] i predicts t(i+1)
    candidates = batched(ntp, blocks, batch_size, lambda logits: logits[:, p].topk(top_k, -1).indices)  # [N, P, K]
    truth = blocks[:, p + 1]  # t(n)
    return {
        "acc": (predicted[:, p - 1] == blocks[:, p]).float().mean().item(),
        "acc_all": (predicted[:, :-1] == blocks[:, 1:]).float().mean().item(),
        "top1_acc": (candidates[..., 0] == truth).float().mean().item(),
        f"top{top_k}_recall": (candidates == truth[..., None]).any(-1).float().mean().item(),
    }


def second_to_last_scores(
    stl: LoadedModel,
    ntp: LoadedModel,
    blocks: Tensor,
    block_length: int,
    top_k: int,
    w: float,
    bonus: str,
    batch_size: int,
) -> dict:
    """The STL model's second-to-last accuracy, and its refinement of the NTP model's candidates."""
    p = swap_positions(blocks.shape[1], block_length)  # [P]
    swapped = swap_pairs(blocks, block_length)  # [N, L]
    stl_predicted = batched(stl, swapped, batch_size, lambda logits: logits[:, p].argmax(-1))  # [N, P] guesses t(p)
    ntp_logits = batched(ntp, blocks, batch_size, lambda logits: logits[:, p])  # [N, P, V] predict t(n), n = p + 1
    refined, recovered_any = [], []
    for i, n in enumerate((p + 1).tolist()):  # predict t(n); (n-1, n) is a swap pair
        logits = ntp_logits[:, i]  # [N, V]
        candidates = logits.topk(top_k, -1).indices  # [N, K]
        trial = swapped[:, :n].repeat_interleave(top_k, 0)  # [N*K, n]; position n-1 held t(n)
        trial[:, n - 1] = candidates.flatten()
        guess = batched(stl, trial, batch_size * top_k, lambda out: out[:, -1].argmax(-1)).view(-1, top_k)  # t(n-1)?
        recovered = guess == blocks[:, n - 1, None]
        refined.append(refine(logits, candidates, recovered, w, bonus) == blocks[:, n])
        recovered_any.append(recovered.any(1))
    mean = lambda parts: torch.stack(parts, 1).float().mean().item()
    return {
        "second_to_last_acc": (stl_predicted == blocks[:, p]).float().mean().item(),
        "refined_top1_acc": mean(refined),
        "stl_recovers_context_share": mean(recovered_any),
    }


def masking_of(loaded: LoadedModel) -> dict:
    """The run's `data.init_args.masking` ({} for a bare hf_model folder)."""
    return loaded.run_config.get("data", {}).get("init_args", {}).get("masking") or {}


def block_length_of(loaded: LoadedModel, given: int | None) -> int:
    block_length = given or (masking_of(loaded).get("init_args") or {}).get("block_length") or 4
    SecondToLastSwap(block_length)  # validates it
    return block_length


def metrics_of(ntp_alone: dict, stl: dict | None, top_k: int) -> dict[str, float]:
    """The suite's metrics, headline first: `acc` and `top1_acc` are the evaluated model's (the
    STL model's second-to-last accuracy and refined top-1, or the NTP model's own)."""
    if stl is None:
        return {
            "acc": ntp_alone["acc"],
            "top1_acc": ntp_alone["top1_acc"],
            "next_token_acc_all": ntp_alone["acc_all"],
            f"next_token_top{top_k}_recall": ntp_alone[f"top{top_k}_recall"],
        }
    return {
        "acc": stl["second_to_last_acc"],
        "top1_acc": stl["refined_top1_acc"],
        "second_to_last_acc": stl["second_to_last_acc"],
        "next_token_acc_same_targets": ntp_alone["acc"],
        "acc_gain": stl["second_to_last_acc"] - ntp_alone["acc"],
        "next_token_acc_all": ntp_alone["acc_all"],
        "next_token_top1_acc": ntp_alone["top1_acc"],
        "refined_top1_acc": stl["refined_top1_acc"],
        "refine_gain": stl["refined_top1_acc"] - ntp_alone["top1_acc"],
        f"next_token_top{top_k}_recall": ntp_alone[f"top{top_k}_recall"],
        "stl_recovers_context_share": stl["stl_recovers_context_share"],
    }


def partner(loaded: LoadedModel, options: Options) -> LoadedModel | None:
    """The NTP model named by `options.ntp`, on the evaluated model's device; both must be causal
    models with one tokenizer."""
    if loaded.objective != "causal":
        raise DataError(f"second_to_last: {loaded.path} is a masked language model; the suite scores causal models")
    if options.ntp is None:
        if str(masking_of(loaded).get("class_path", "")).endswith("SecondToLastSwap"):
            raise DataError(
                f"second_to_last.ntp: {loaded.path} is a second-to-last model; name the next-token run it is "
                "compared with (without ntp the evaluated model is scored as the next-token model)"
            )
        return None
    ntp = load_model(options.ntp)
    if ntp.objective != "causal":
        raise DataError(f"second_to_last.ntp: {ntp.path} is a masked language model; both models must be causal")
    if ntp.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise DataError(
            f"second_to_last.ntp: {ntp.path} uses another tokenizer than {loaded.path}; "
            "train both on the same data (same data.* keys)"
        )
    ntp.model.to(loaded.device)
    return ntp


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes (an encoder: none, the suite refuses it), from `metrics_of` itself so the
    two cannot drift apart; a study checks its metric names with them before training."""
    if objective != "causal":
        return []
    return list(metrics_of(defaultdict(float), defaultdict(float) if options.ntp else None, options.top_k))


def run(loaded: LoadedModel, options: Options) -> SuiteResult:
    if options.top_k < 1:
        raise DataError(f"second_to_last.top_k must be >= 1, got {options.top_k}")
    ntp = partner(loaded, options)
    block_length = block_length_of(loaded, options.block_length)
    block_size = options.block_size or loaded.block_size or 128
    texts = heldout_texts(options.text, options.seed, options.documents)
    blocks = heldout_blocks(texts, loaded, block_size, options.max_blocks)  # [N, block_size]
    if blocks.shape[1] <= block_length:
        raise DataError(f"second_to_last: blocks of {block_size} tokens hold no swap pair of period {block_length}")
    ntp_alone = next_token_scores(ntp or loaded, blocks, block_length, options.top_k, options.batch_size)
    stl = None
    if ntp is not None:
        stl = second_to_last_scores(
            loaded, ntp, blocks, block_length, options.top_k, options.w, options.bonus, options.batch_size
        )
    metrics = metrics_of(ntp_alone, stl, options.top_k)
    targets = len(blocks) * len(swap_positions(block_size, block_length))
    source = options.text or f"built-in validation split (seed {options.seed})"
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())
    return SuiteResult(
        metrics=metrics,
        table=(
            f"{'second-to-last model vs ' + str(ntp.path) if ntp else 'next-token model alone'}; {source}, "
            f"{len(blocks)} blocks × {block_size} tokens, swap period {block_length}, {targets} targets\n\n"
            f"| metric | value |\n| --- | --- |\n{rows}"
        ),
        details={
            "ntp": str(ntp.path) if ntp else None,
            "text": source,
            "blocks": len(blocks),
            "block_size": block_size,
            "block_length": block_length,
            "targets": targets,
            "top_k": options.top_k,
            "w": options.w,
            "bonus": options.bonus,
        },
    )
