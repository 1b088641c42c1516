"""Evaluate a finished model on downstream suites.

    python -m experiments.evaluate --run runs/quickstart/version_0 --suites needle,retrieval,ppl
    python -m experiments.evaluate --run RUN --suites blimp --blimp.data ../shared/data/blimp --blimp.max_pairs 100

`--run` is a masklab run dir (its `hf_model/` is evaluated) or any local transformers model folder.
Every suite's options are keys `--<suite>.<option>` (see `--help`), or a YAML file given with
`--config`. Results go into the run's `metrics.json` as `eval/<suite>/<metric>`, or
`eval/<suite>@<data>/<metric>` when an option chooses other data than the suite's default; a re-run
replaces its own keys and keeps every other (docs/evaluation.md, "metrics.json keys"). They are
logged to TensorBoard in the run dir under the same tags, and written with their plots and a
markdown report to `<run>/eval/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from torch.utils.tensorboard import SummaryWriter
from transformers.utils import logging as transformers_logging

import experiments.quiet  # noqa: F401  (installs the filters of what a user cannot act on)
from core.errors import ConfigError, MasklabError
from evaluation.model import load_model, model_dir
from evaluation.suites import (
    SUITES,
    flat_metrics,
    parse_suites,
    run_suites,
    save_results,
    suite_module,
)
from experiments.cli_errors import config_args, parse_error
from experiments.run_dir import trained_step


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m experiments.evaluate",
        description=__doc__.split("\n\n")[0],
        exit_on_error=False,  # parse errors become one line, not a usage dump
        allow_abbrev=False,  # --ppl.max_block is a typo to report, not max_blocks
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of any of these keys")
    parser.add_argument("--run", type=str, required=True, help="a masklab run dir or a local transformers model folder")
    parser.add_argument("--suites", type=str, required=True, help=f"comma-separated suites to run: {', '.join(SUITES)}")
    parser.add_argument("--device", type=str, default="auto", help="torch device; auto = cuda when available, else cpu")
    parser.add_argument(
        "--out", type=str | None, default=None, help="folder for plots and the report; default <run dir>/eval"
    )
    parser.add_argument(
        "--step",
        type=int | None,
        default=None,
        help="TensorBoard step of the logged results; default the step its training ended at (0 for a bare model)",
    )
    for name in SUITES:
        parser.add_class_arguments(suite_module(name).Options, name, help=f"options of the {name} suite")
    return parser


def run_dir_of(folder: Path) -> Path:
    """The run that exported `folder` (its parent holds config.yaml), else the folder itself."""
    return folder.parent if (folder.parent / "config.yaml").is_file() else folder


def make_out_dir(config_out: str | None, run_dir: Path) -> Path:
    """The folder for plots and the report, made before anything is evaluated or logged."""
    out_dir = Path(config_out) if config_out else run_dir / "eval"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out: cannot make {out_dir}: {err.strerror}") from None
    return out_dir


def main(args: list[str] | None = None) -> dict[str, float]:
    parser = build_parser()
    transformers_logging.disable_progress_bar()  # weight-loading bars would bury the report
    try:
        try:
            config = parser.parse_args(args)
        except ArgumentError as err:
            files = config_args(sys.argv[1:] if args is None else args)
            raise ConfigError(parse_error(str(err), list(parser._option_string_actions), files)) from None
        names = parse_suites(config.suites)
        folder = model_dir(config.run)
        run_dir = run_dir_of(folder)
        out_dir = make_out_dir(config.out, run_dir)
        objects = parser.instantiate(config)
        loaded = load_model(str(folder))
        device = (
            "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device.replace("auto", "cpu")
        )
        try:
            loaded.model.to(device)
        except (RuntimeError, AssertionError) as err:
            raise ConfigError(f"--device {config.device!r} cannot be used: {err}") from None
        results = run_suites(loaded, {name: objects[name] for name in names})
    except MasklabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    with SummaryWriter(str(run_dir)) as writer:
        step = trained_step(run_dir) if config.step is None else config.step
        report = save_results(results, out_dir, run_dir / "metrics.json", writer, step)
    print(report.read_text())
    print(f"metrics: {run_dir / 'metrics.json'}\nreport: {report}")
    return flat_metrics(results)


if __name__ == "__main__":
    main()
