"""MEAP fine-tuning study: pre-train NTP vs MEAP, fine-tune each with plain vs MEAP SFT, and score
key–value retrieval by position.

``python -m experiments.study --config experiments/configs/studies/meap_sft.yaml``

Every run goes through `experiments.run.main`, so each leaves its usual run dir; a fine-tune
starts from its pre-training run (`model.init_args.init_from`) with that run's tokenizer
(`data.init_args.tokenizer_path`). `shared_args` go to every run, so the model shapes match.
The results — one `experiments.eval_retrieval` result per pre-training × fine-tuning pair — are
written to ``<runs_dir>/study.json`` and printed as a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from experiments import eval_retrieval
from experiments.run import main as run


def run_dir(args: list[str]) -> Path:
    return Path(run(args).trainer.log_dir)


def study(config: dict) -> dict:
    runs_dir = config["runs_dir"]
    shared = [str(a) for a in config.get("shared_args", [])]
    evaluation = config.get("eval", {})
    results = {}
    for pre_name, pre_config in config["pretrain"]["configs"].items():
        pre_dir = run_dir(
            [
                "--config",
                pre_config,
                *shared,
                *map(str, config["pretrain"].get("args", [])),
                "--runs_dir",
                runs_dir,
                "--experiment",
                f"pretrain_{pre_name}",
            ]
        )
        for ft_name, ft_config in config["finetune"]["configs"].items():
            ft_dir = run_dir(
                [
                    "--config",
                    ft_config,
                    *shared,
                    *map(str, config["finetune"].get("args", [])),
                    "--model.init_args.init_from",
                    str(pre_dir),
                    "--data.init_args.tokenizer_path",
                    str(pre_dir),
                    "--runs_dir",
                    runs_dir,
                    "--experiment",
                    f"{pre_name}_then_sft_{ft_name}",
                ]
            )
            results[f"{pre_name}+sft_{ft_name}"] = eval_retrieval.evaluate(str(ft_dir), **evaluation)
    (Path(runs_dir) / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    bins = next(iter(results.values()))["by_position"]
    header = (
        "| pre-training + fine-tuning | accuracy | "
        + " | ".join(f"pos {b['from']:.1f}-{b['to']:.1f}" for b in bins)
        + " |"
    )
    lines = [header, "|" + " --- |" * (2 + len(bins))]
    for name, result in results.items():
        cells = ["–" if b["accuracy"] is None else f"{b['accuracy']:.2f}" for b in result["by_position"]]
        lines.append(f"| {name} | {result['accuracy']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the study YAML (see experiments/configs/studies/)")
    parser.add_argument("--runs_dir", help="override the study's runs_dir")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    if args.runs_dir:
        config["runs_dir"] = args.runs_dir
    results = study(config)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
