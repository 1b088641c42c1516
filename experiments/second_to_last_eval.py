"""Second-to-last vs next-token accuracy, and generate-then-refine decoding (arXiv 2411.15661).

    python -m experiments.second_to_last_eval --stl runs/second_to_last/version_0 --ntp runs/ntp/version_0

The `second_to_last` evaluation suite (evaluation/second_to_last.py, where the measures are
described) on one pair of runs, written to `<stl run>/second_to_last_eval.json`. The same numbers
go into a run's metrics.json as `eval/second_to_last/<metric>` with
`python -m experiments.evaluate --run STL --suites second_to_last --second_to_last.ntp NTP`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import MasklabError
from evaluation import second_to_last
from evaluation.heldout import add_text_arguments
from evaluation.model import load_model


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
    options = second_to_last.Options(
        ntp=args.ntp,
        block_length=args.block_length,
        top_k=args.top_k,
        w=args.w,
        bonus=args.bonus,
        text=args.text,
        documents=args.documents,
        seed=args.seed,
        block_size=args.block_size,
        max_blocks=args.max_blocks,
        batch_size=args.batch_size,
    )
    try:
        stl = load_model(args.stl)
        result = second_to_last.run(stl, options)
    except (MasklabError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    written = {"stl": str(stl.path), **result.details, **result.metrics}
    out = Path(args.out) if args.out else (stl.path.parent if stl.run_config else stl.path) / "second_to_last_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(written, indent=2) + "\n")
    print(
        f"second-to-last acc {written['second_to_last_acc']:.4f} vs next-token acc "
        f"{written['next_token_acc_same_targets']:.4f} (same targets); top-1 next-token "
        f"{written['next_token_top1_acc']:.4f} -> refined {written['refined_top1_acc']:.4f}\n"
        f"wrote {out}"
    )
    return written


if __name__ == "__main__":
    main()
