"""Second-to-last vs next-token accuracy, and generate-then-refine decoding (arXiv 2411.15661).

    python -m experiments.second_to_last_eval --stl runs/second_to_last/version_0 --ntp runs/ntp/version_0

On held-out blocks, with l the swap period of the second-to-last (STL) model:

* second-to-last accuracy: the STL model at every swap position p predicts t(p) having seen
  t0 .. t(p-1) and t(p+1); next-token accuracy: the NTP model predicts the same t(p) from
  t0 .. t(p-1) (and, for reference, every token of the block).
* refinement: at each n = l, 2l, ... the NTP model proposes its top-k next tokens for t(n);
  each candidate c is put in the place of t(n) in the STL model's (swapped) input, and if the
  STL model then recovers the true last context token t(n-1), c gets a bonus. Reported: top-1
  next-token accuracy with and without refinement.

The bonus: the paper's released code multiplies the candidate's *logit* by 1 + w (w = 0.05),
which lowers a negative logit, turning the bonus into a penalty, and depends on the arbitrary
offset of the logits. masklab's default adds log(1 + w) to the candidate's *log-probability*
(multiplies its probability by 1 + w), which is always a bonus; `--bonus logit` reproduces the
reference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

from core.errors import DataError, MasklabError
from datamodules.masking import TokenBlock
from datamodules.policies.swap import SecondToLastSwap, swap_pairs, swap_positions
from evaluation.heldout import add_text_arguments, heldout_blocks, heldout_texts
from evaluation.model import LoadedModel, load_model


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
    raise ValueError(f"--bonus must be 'logprob' or 'logit', got {bonus!r}")


def refine(logits: Tensor, candidates: Tensor, recovered: Tensor, w: float, bonus: str = "logprob") -> Tensor:
    """[N] the refined choice among the candidates."""
    best = refine_scores(logits, candidates, recovered, w, bonus).argmax(1, keepdim=True)  # [N, 1]
    return candidates.gather(1, best).squeeze(1)


def logits_of(loaded: LoadedModel, ids: Tensor, batch_size: int) -> Tensor:
    """[N, L, V] float logits, computed `batch_size` rows at a time."""
    with torch.no_grad():
        return torch.cat(
            [loaded.model(input_ids=ids[i : i + batch_size]).logits.float() for i in range(0, len(ids), batch_size)]
        )


def accuracies(
    stl: LoadedModel, ntp: LoadedModel, blocks: Tensor, block_length: int, batch_size: int
) -> dict[str, float]:
    """Second-to-last accuracy of the STL model and next-token accuracy of the NTP model on the
    same target tokens t(p)."""
    batch = SecondToLastSwap(block_length)(TokenBlock.from_ids(blocks, stl.vocab), torch.Generator())
    p = swap_positions(blocks.shape[1], block_length)  # [P]
    stl_pred = logits_of(stl, batch["input_ids"], batch_size)[:, p].argmax(-1)  # [N, P] predicts t(p)
    ntp_pred = logits_of(ntp, blocks, batch_size).argmax(-1)  # [N, L] position i predicts t(i+1)
    return {
        "second_to_last_acc": (stl_pred == blocks[:, p]).float().mean().item(),
        "next_token_acc_same_targets": (ntp_pred[:, p - 1] == blocks[:, p]).float().mean().item(),
        "next_token_acc_all": (ntp_pred[:, :-1] == blocks[:, 1:]).float().mean().item(),
        "targets": int(p.numel() * len(blocks)),
    }


def refinement(
    stl: LoadedModel, ntp: LoadedModel, blocks: Tensor, block_length: int, k: int, w: float, bonus: str, batch_size: int
) -> dict[str, float]:
    """Top-1 next-token accuracy of the NTP model with and without refinement by the STL model."""
    ntp_logits = logits_of(ntp, blocks, batch_size)  # [N, L, V]
    swapped = swap_pairs(blocks, block_length)  # [N, L]
    plain, refined, in_top_k, recovered_any = [], [], [], []
    for n in range(block_length, blocks.shape[1], block_length):  # predict t(n); (n-1, n) is a swap pair
        logits = ntp_logits[:, n - 1]  # [N, V]
        candidates = logits.topk(k, -1).indices  # [N, K]
        trial = swapped[:, :n].repeat_interleave(k, 0)  # [N*K, n]; position n-1 held t(n)
        trial[:, n - 1] = candidates.flatten()
        guess = logits_of(stl, trial, batch_size * k)[:, n - 1].argmax(-1).view(-1, k)  # [N, K] guesses of t(n-1)
        recovered = guess == blocks[:, n - 1, None]
        truth = blocks[:, n]
        plain.append(candidates[:, 0] == truth)
        refined.append(refine(logits, candidates, recovered, w, bonus) == truth)
        in_top_k.append((candidates == truth[:, None]).any(1))
        recovered_any.append(recovered.any(1))
    cat = lambda parts: torch.cat(parts).float().mean().item()
    return {
        "next_token_top1_acc": cat(plain),
        "refined_top1_acc": cat(refined),
        f"next_token_top{k}_recall": cat(in_top_k),
        "stl_recovers_context_share": cat(recovered_any),
        "refine_targets": sum(len(p) for p in plain),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.second_to_last_eval", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--stl", required=True, help="second-to-last run dir or hf_model folder (second_to_last.yaml)")
    parser.add_argument(
        "--ntp", required=True, help="next-token run dir or hf_model folder of the same size (ntp.yaml)"
    )
    parser.add_argument("--block-length", type=int, help="swap period l; default: the STL run's, else 4")
    parser.add_argument("--top-k", type=int, default=15, help="NTP candidates to refine (default 15, as the paper)")
    parser.add_argument("--w", type=float, default=0.05, help="bonus weight (default 0.05, as the paper)")
    parser.add_argument(
        "--bonus",
        choices=("logprob", "logit"),
        default="logprob",
        help="logprob: + log(1+w) to the log-probability (default); logit: logit * (1+w), the reference code",
    )
    parser.add_argument("--out", help="JSON output; default <stl run>/second_to_last_eval.json")
    add_text_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        stl, ntp = load_model(args.stl), load_model(args.ntp)
        for name, loaded in (("--stl", stl), ("--ntp", ntp)):
            if loaded.objective != "causal":
                raise DataError(f"{name} {loaded.path} is a masked language model; both models must be causal")
        if len(stl.tokenizer) != len(ntp.tokenizer) or stl.tokenizer.get_vocab() != ntp.tokenizer.get_vocab():
            raise DataError("--stl and --ntp use different tokenizers; train both on the same data (same data.* keys)")
        masking = stl.run_config.get("data", {}).get("masking", {})
        block_length = args.block_length or (masking.get("init_args") or {}).get("block_length") or 4
        SecondToLastSwap(block_length)  # validates it
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        block_size = args.block_size or stl.block_size or 128
        blocks = heldout_blocks(heldout_texts(args.text, args.seed, args.documents), stl, block_size, args.max_blocks)
    except (MasklabError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    result = {
        "stl": str(stl.path),
        "ntp": str(ntp.path),
        "block_length": block_length,
        "block_size": block_size,
        "blocks": len(blocks),
        "top_k": args.top_k,
        "w": args.w,
        "bonus": args.bonus,
        **accuracies(stl, ntp, blocks, block_length, args.batch_size),
        **refinement(stl, ntp, blocks, block_length, args.top_k, args.w, args.bonus, args.batch_size),
    }
    out = Path(args.out) if args.out else (stl.path.parent if stl.run_config else stl.path) / "second_to_last_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"second-to-last acc {result['second_to_last_acc']:.4f} vs next-token acc "
        f"{result['next_token_acc_same_targets']:.4f} (same targets); top-1 next-token "
        f"{result['next_token_top1_acc']:.4f} -> refined {result['refined_top1_acc']:.4f}\n"
        f"wrote {out}"
    )
    return result


if __name__ == "__main__":
    main()
