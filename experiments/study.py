"""Run a study: every arm x seed of a study YAML, each in its own process, then a report.

    python -m experiments.study --config experiments/configs/studies/<name>.yaml
        [--seeds N] [--size gpu] [--parallel N] [--dry-run] [--resume [FOLDER]] [--studies_dir DIR]

Each run is `experiments.run` with the arm's config and overrides, one seed for model
initialisation, data order and masks (`--seed_everything S --data.init_args.seed S`), then
`experiments.evaluate` on its model. Everything goes to `<studies_dir>/<name>/<timestamp>/`:
`runs/<arm>/seed_<S>/` (TensorBoard runs), `configs/`, `results.csv`, `report.md` and `plots/`.
`--resume` continues the newest (or the named) study folder: finished runs are skipped, an
interrupted one resumes from its last checkpoint. The YAML format is in docs/studies.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import yaml

from callbacks.peak_flops import peak_flops
from core.errors import ConfigError, MasklabError
from datamodules.recall import RecallConfig
from evaluation.suites import suite_module
from experiments.study_config import DEFAULT_SIZE, Arm, Study, load_study, metric_name_errors, resolve_references

OUTCOME = "outcome.json"  # written into <study>/runs/<arm>/seed_<S>/ when the run is over, ok or failed
TRAINED = "trained.json"  # written there when its training process ended well, with the model exported


@dataclass(frozen=True)
class ArmPlan:
    """How one arm trains: tokens per optimiser step (batch x block x accumulation x devices),
    the steps that reach its budget, and the tokens of its own run (without the runs it starts from)."""

    tokens_per_step: int
    max_steps: int
    tokens: int
    estimate_s: float
    config: dict


@dataclass
class Outcome:
    arm: str
    seed: int
    status: str  # "ok" or "failed"
    run_dir: str | None = None
    train_s: float = 0.0
    eval_s: float = 0.0
    tokens: int = 0
    error: str | None = None


def cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def arm_args(study: Study, arm: Arm, runs: dict[str, str]) -> list[str]:
    """The arm's `experiments.run` arguments, its `${ARM}` references replaced by `runs`' run dirs."""
    return ["--config", arm.config, *study.args, *resolve_references(arm.args, runs)]


def resolved_config(study: Study, arm: Arm) -> dict:
    """The arm's config as `experiments.run --print_config` resolves it (in this process: the
    imports are paid once). A config the run parser rejects is a ConfigError naming the arm. Runs
    not trained yet stand in for `${ARM}` as `runs/ARM/seed_0/version_0` (relative to the study folder)."""
    from experiments.run import main as run_main

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    runs = {need: f"runs/{need}/seed_0/version_0" for need in arm.needs}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(
                [*arm_args(study, arm, runs), "--seed_everything", "0", "--data.init_args.seed", "0", "--print_config"]
            )
        except SystemExit as exit_:
            code = exit_.code
    if code not in (0, None):
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "error:" in line), lines[-1] if lines else f"exit {code}")
        raise ConfigError(f"{study.file}: arms.{arm.name}: {reason.split('error:', 1)[-1].strip()}")
    return yaml.safe_load(out.getvalue())


def objective_of(config: dict) -> str:
    """ "causal" or "mlm": the objective of the LightningModule a resolved run config trains."""
    module, _, name = config["model"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name).objective


def tokens_per_step(config: dict) -> int:
    data = config["data"]["init_args"]
    trainer = config.get("trainer") or {}
    devices = trainer.get("devices")
    devices = devices if isinstance(devices, int) and devices > 0 else 1  # "auto" on this machine's one device
    return (
        int(data["batch_size"])
        * int(data["block_size"])
        * int(trainer.get("accumulate_grad_batches") or 1)
        * devices
        * int(trainer.get("num_nodes") or 1)
    )


def flops_per_token(config: dict) -> float:
    """Training FLOPs per token of a resolved run config, from lightning_modules/flops.py:
    6 x (body 12·layers·d² + head vocab·d) + attention 12·layers·d·block."""
    d, layers = model_shape(config)
    data = config["data"]["init_args"]
    if data.get("builtin_variant") == "recall":  # its own id vocabulary: data.vocab_size does not apply
        vocab = len(RecallConfig(**(data.get("recall") or {})).tokens())
    else:
        vocab = int(data.get("vocab_size") or 4096)
    block = int(data["block_size"])
    return 6 * (12 * layers * d * d + vocab * d) + 12 * layers * d * block


def model_shape(config: dict) -> tuple[int, int]:
    """(width, layers) of a resolved run config."""
    model = config["model"]["init_args"]
    return int(model.get("hidden_size") or 256), int(model.get("num_layers") or 4)


def estimate_seconds(config: dict, tokens: int, matmul_flops: float) -> float:
    """Training time of `tokens` at the share of this machine's matmul rate that a model of this
    width reaches. A guide (docs/studies.md)."""
    return flops_per_token(config) * tokens / (matmul_flops * training_efficiency(model_shape(config)[0]))


# One H200, 6 runs at once (2026-12-04, docs/speed.md): small models wait on kernel launches, about
# 16 ms per layer per step (35 ms for 2 layers, 65 ms for 4, from 8k to 33k tokens a step); a run's
# process start, data, export and evaluation took 30-60 s beside it; the 134m-500m shapes reach
# 21-43% MFU alone.
GPU_STEP_S_PER_LAYER = 0.016
GPU_RUN_OVERHEAD_S = 50.0
GPU_MFU = 0.3


def gpu_seconds(config: dict, tokens: int, device: str) -> float:
    """Time of one run of `tokens` on one GPU `device` in bf16, beside the study's other runs: the
    slower of the model FLOPs at `GPU_MFU` and the launch-bound floor per step, plus a run's fixed cost."""
    from torch import bfloat16

    compute = flops_per_token(config) * tokens / (peak_flops(device, bfloat16) * GPU_MFU)
    launches = tokens / tokens_per_step(config) * model_shape(config)[1] * GPU_STEP_S_PER_LAYER
    return max(compute, launches) + GPU_RUN_OVERHEAD_S


def training_efficiency(width: int) -> float:
    """Training FLOP/s over the matmul rate on CPU, which grows with the model's width (small
    matrices use the cores badly): ~width / 3000, from 0.26 at width 768 (Llama 122M, 131 tok/s,
    docs/speed.md), 0.03 at 64 (benchmarks.gpu tiny, 12,781 tok/s) and 0.05 at 128 (a 128 x 2
    pre-training, ~2,500 tok/s on a busy 2-core machine); at most 0.26, the widest measured."""
    return min(0.26, width / 3000)


def plan(study: Study, matmul_flops: float) -> dict[str, ArmPlan]:
    """Every arm's config resolved and its budget worked out; unequal budgets are an error
    unless the study allows them."""
    plans = {}
    for arm in study.arms.values():
        config = resolved_config(study, arm)
        per_step = tokens_per_step(config)
        budget = arm.budget_tokens or study.budget_tokens
        if budget:
            max_steps, tokens = math.ceil(budget / per_step), budget
        else:
            max_steps = int((config.get("trainer") or {}).get("max_steps") or -1)
            if max_steps < 1:
                raise ConfigError(f"{study.file}: arms.{arm.name}: set budget_tokens or trainer.max_steps")
            tokens = max_steps * per_step
        if study.device:
            seconds = gpu_seconds(config, tokens, study.device)
        else:
            seconds = estimate_seconds(config, tokens, matmul_flops)
        plans[arm.name] = ArmPlan(per_step, max_steps, tokens, seconds, config)
    objectives = {name: (objective_of(plans[name].config),) for name in study.compared}
    if errors := metric_name_errors(study, objectives):  # now that each arm's model is known
        raise ConfigError([f"{study.file}: {e}" for e in errors])
    totals = {name: sum(plans[a].tokens for a in study.chain(name)) for name in study.compared}
    if len(set(totals.values())) > 1 and not study.allow_unequal_budgets:
        listed = ", ".join(f"{name}={tokens:,}" for name, tokens in totals.items())
        raise ConfigError(
            f"{study.file}: the compared arms train different numbers of tokens ({listed}); "
            "set budget_tokens, or allow_unequal_budgets: true"
        )
    return plans


def matmul_flops(threads: int) -> float:
    """This machine's float32 matmul FLOP/s at `threads` threads: one core's rate (the best of 30
    products of 512 x 512, so that other processes on the machine count little) x threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    best = math.inf
    for _ in range(30):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * 512**3 / best * threads


def study_dir(study: Study, root: Path, resume: str | None) -> Path:
    """A new `<root>/<name>/<timestamp>`, or the study folder to continue."""
    if resume is None:
        folder = root / study.name / datetime.now().strftime("%Y%m%d-%H%M%S")
        folder.mkdir(parents=True)
        return folder
    if resume == "latest":
        started = sorted(p for p in (root / study.name).glob("*") if (p / "study.json").is_file())
        if not started:
            raise ConfigError(f"--resume: no study folder under {root / study.name} to continue")
        return started[-1]
    folder = Path(resume)
    if not (folder / "study.json").is_file():
        raise ConfigError(f"--resume: {resume!r} is not a study folder (it has no study.json)")
    return folder


def identity(study: Study) -> dict:
    """What must not change when a study folder is continued (more seeds may be added)."""
    fields = asdict(study)
    for key in ("seeds", "file", "question"):
        fields.pop(key)
    for arm in fields["arms"].values():  # folders started before arms had evaluate_args resume as they were
        if not arm["evaluate_args"]:
            del arm["evaluate_args"]
    return json.loads(json.dumps(fields))


def record_study(folder: Path, study: Study, plans: dict[str, ArmPlan]) -> None:
    saved = folder / "study.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        if before != identity(study):
            changed = sorted(k for k in identity(study) if before.get(k) != identity(study)[k])
            raise ConfigError(
                f"--resume: {folder} was started from a different study ({', '.join(changed)} changed); "
                "start a new study folder instead"
            )
    else:
        saved.write_text(json.dumps(identity(study), indent=2) + "\n")
    (folder / "configs").mkdir(exist_ok=True)
    for name, arm_plan in plans.items():
        (folder / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(arm_plan.config, sort_keys=False))
    (folder / "configs" / "study.yaml").write_text(Path(study.file).read_text())


def launch(command: list[str], log: Path, threads: int) -> int:
    """Run one command in its own process with `threads` threads, its output appended to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode


def failure(log: Path) -> str:
    """The error line of a failed process's log (its last line when it printed none)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")


def newest_version(experiment: Path) -> Path | None:
    versions = sorted(experiment.glob("version_*"), key=lambda p: int(p.name.removeprefix("version_")))
    return versions[-1] if versions else None


class Driver:
    """Runs the study's jobs (arm, seed); a job waits for the same-seed runs its arm needs."""

    def __init__(self, study: Study, plans: dict[str, ArmPlan], folder: Path, parallel: int) -> None:
        self.study, self.plans, self.folder = study, plans, folder
        self.threads = max(1, cores() // parallel)
        self.parallel = parallel
        self.done = 0
        self.lock = threading.Lock()  # progress lines come from the pool's threads

    def experiment(self, arm: str, seed: int) -> Path:
        return self.folder / "runs" / arm / f"seed_{seed}"

    def run_all(self) -> list[Outcome]:
        jobs = sorted(
            ((arm, seed) for arm in self.study.arms for seed in self.study.seeds),
            key=lambda job: (self.study.depth(job[0]), job[1]),
        )
        futures: dict[tuple[str, int], Future] = {}
        with ThreadPoolExecutor(self.parallel) as pool:
            try:
                for arm, seed in jobs:  # a job is queued after the jobs it waits for: the pool cannot deadlock
                    needs = {need: futures[need, seed] for need in self.study.arms[arm].needs}
                    futures[arm, seed] = pool.submit(self.job, arm, seed, needs, len(jobs))
                return [futures[job].result() for job in jobs]
            except BaseException:  # Ctrl-C: the running processes get it too; start no queued run
                pool.shutdown(cancel_futures=True)
                raise

    def job(self, arm: str, seed: int, needs: dict[str, Future], total: int) -> Outcome:
        experiment = self.experiment(arm, seed)
        experiment.mkdir(parents=True, exist_ok=True)
        marker = experiment / OUTCOME
        if marker.is_file() and (previous := Outcome(**json.loads(marker.read_text()))).status == "ok":
            self.progress(total, f"{arm} seed {seed}: finished before, skipped")
            return previous
        outcome = self.execute(arm, seed, experiment, {need: done.result() for need, done in needs.items()})
        marker.write_text(json.dumps(asdict(outcome), indent=2) + "\n")
        said = (
            f"failed: {outcome.error}"
            if outcome.status != "ok"
            else f"ok (training {outcome.train_s:.0f} s, evaluation {outcome.eval_s:.0f} s)"
        )
        self.progress(total, f"{arm} seed {seed}: {said}")
        return outcome

    def progress(self, total: int, message: str) -> None:
        with self.lock:
            self.done += 1
            print(f"[{self.done}/{total}] {message}", flush=True)

    def execute(self, arm_name: str, seed: int, experiment: Path, needs: dict[str, Outcome]) -> Outcome:
        arm, plan_ = self.study.arms[arm_name], self.plans[arm_name]
        outcome = Outcome(arm_name, seed, "failed", tokens=plan_.max_steps * plan_.tokens_per_step)
        if failed := [need for need, done in needs.items() if done.status != "ok"]:
            relation = "starts from" if failed[0] == arm.init_from else "refers to"
            outcome.error = f"the run it {relation} ({failed[0]} seed {seed}) failed"
            return outcome
        parent = needs.get(arm.init_from) if arm.init_from else None
        trained = experiment / TRAINED
        if trained.is_file():  # trained before, then stopped or failed in evaluation
            done = json.loads(trained.read_text())
            run, outcome.train_s = Path(done["run_dir"]), done["train_s"]
        else:
            run = newest_version(experiment)
            command = [
                sys.executable,
                "-m",
                "experiments.run",
                *arm_args(self.study, arm, {need: str(done.run_dir) for need, done in needs.items()}),
                "--seed_everything",
                str(seed),
                "--data.init_args.seed",
                str(seed),
                "--trainer.max_steps",
                str(plan_.max_steps),
                "--runs_dir",
                str(self.folder / "runs"),
                "--experiment",
                f"{arm_name}/seed_{seed}",
            ]
            if parent is not None:
                command += [
                    "--model.init_args.init_from",
                    parent.run_dir,
                    "--data.init_args.tokenizer_path",
                    parent.run_dir,
                ]
            if run is not None and (run / "checkpoints" / "last.ckpt").is_file():
                command += ["--ckpt_path", "last"]  # an interrupted run continues into its own directory
            start = time.perf_counter()
            code = launch(command, experiment / "train.log", self.threads)
            outcome.train_s = time.perf_counter() - start
            run = newest_version(experiment)
            if code != 0 or run is None or not (run / "hf_model").is_dir():
                outcome.error = f"training: {failure(experiment / 'train.log')} (log: {experiment / 'train.log'})"
                return outcome
            record = {"run_dir": str(run), "train_s": outcome.train_s, "tokens": outcome.tokens}
            trained.write_text(json.dumps(record) + "\n")
        outcome.run_dir = str(run)
        if arm.compare and self.study.suites:
            start = time.perf_counter()
            runs = {need: str(done.run_dir) for need, done in needs.items()}
            code = launch(self.evaluate_command(arm, run, seed, runs), experiment / "eval.log", self.threads)
            outcome.eval_s = time.perf_counter() - start
            if code != 0:
                outcome.error = f"evaluation: {failure(experiment / 'eval.log')} (log: {experiment / 'eval.log'})"
                return outcome
        outcome.status = "ok"
        return outcome

    def evaluate_command(self, arm: Arm, run: Path, seed: int, runs: dict[str, str]) -> list[str]:
        """Each suite's examples are drawn with the run's seed (the built-in corpus of that seed is the
        one the run trained on); the study's evaluate args come after, so they can override it, then
        the arm's evaluate_args, their `${ARM}` references replaced by `runs`' run dirs."""
        seeded = [
            token
            for suite in self.study.suites
            if "seed" in suite_module(suite).Options.__dataclass_fields__
            for token in (f"--{suite}.seed", str(seed))
        ]
        return [
            sys.executable,
            "-m",
            "experiments.evaluate",
            "--run",
            str(run),
            "--suites",
            ",".join(self.study.suites),
            *seeded,
            *self.study.eval_args,
            *resolve_references(arm.evaluate_args, runs),
        ]


def measured_seconds(study: Study, root: Path, plans: dict[str, ArmPlan]) -> dict[str, float]:
    """Per arm, the training time that earlier folders of this study at this size measured, scaled
    to the planned tokens (the median seconds per token of their trained runs)."""
    rates: dict[str, list[float]] = {}
    for folder in (root / study.name).glob("*"):
        saved = folder / "study.json"
        if not saved.is_file() or json.loads(saved.read_text()).get("size") != study.size:
            continue
        for record in folder.glob(f"runs/*/seed_*/{TRAINED}"):
            done = json.loads(record.read_text())
            if done.get("tokens"):
                rates.setdefault(record.parent.parent.name, []).append(done["train_s"] / done["tokens"])
    return {arm: statistics.median(r) * plans[arm].tokens for arm, r in rates.items() if arm in plans}


def dry_run(study: Study, plans: dict[str, ArmPlan], parallel: int, measured: dict[str, float]) -> str:
    """The arms x seeds plan, as printed by --dry-run; times measured by earlier runs of the study
    where there are any, else the FLOP-based guide."""
    seconds = {name: measured.get(name, p.estimate_s) for name, p in plans.items()}
    place = f"on one {study.device}" if study.device else "here"
    rows = [
        f"| arm | config | starts from / refers to | tokens/step | steps | tokens | est. time per run {place} |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, arm in study.arms.items():
        p = plans[name]
        rows.append(
            f"| {name}{'' if arm.compare else ' (not compared)'} | {arm.config} | {', '.join(arm.needs) or '-'} | "
            f"{p.tokens_per_step:,} | {p.max_steps:,} | {p.tokens:,} | {minutes(seconds[name])} "
            f"({'measured' if name in measured else 'FLOP guide'}) |"
        )
    total = sum(seconds.values()) * len(study.seeds) / parallel
    if study.device:
        where = f"estimated device time on one {study.device}: ~{minutes(total)} in all, {parallel} runs at a time"
    else:
        where = (
            f"estimated training time: ~{minutes(total)} in all; evaluation, process start and data preparation "
            "are not included, and the FLOP guide can be off several-fold for small models (docs/studies.md)"
        )
    return "\n".join(
        [
            f"study {study.name} (size {study.size}): {len(study.arms)} arms x {len(study.seeds)} seeds "
            f"{list(study.seeds)} = {len(study.arms) * len(study.seeds)} runs, {parallel} at a time",
            f"question: {study.question}",
            f"baseline: {study.baseline}; metrics: "
            + ", ".join(f"{m} ({d} is better)" for m, d in study.metrics.items()),
            f"evaluate: {', '.join(study.suites) or '(no suites)'} {' '.join(study.eval_args)}".rstrip(),
            "",
            *rows,
            "",
            where,
            "every config is valid; nothing was trained (--dry-run)",
        ]
    )


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the study YAML (experiments/configs/studies/<name>.yaml)")
    parser.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the study's seeds")
    parser.add_argument(
        "--size",
        default=DEFAULT_SIZE,
        help="a size of the study's `sizes` (default: cpu; the top level alone when sizes has no cpu)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="runs at once; the CPU threads are split between them")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and validate every config; train nothing"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue a study folder (default: the newest of this study): finished runs are skipped",
    )
    parser.add_argument("--studies_dir", default="studies", help="where study folders go (default: studies)")
    return parser


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.parallel < 1:
            raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
        study = load_study(args.config, args.size, args.seeds)
        threads = max(1, cores() // args.parallel)
        plans = plan(study, matmul_flops(threads))
        if args.dry_run:
            print(dry_run(study, plans, args.parallel, measured_seconds(study, Path(args.studies_dir), plans)))
            return None
        folder = study_dir(study, Path(args.studies_dir), args.resume)
        record_study(folder, study, plans)
    except MasklabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"study folder: {folder}", flush=True)
    try:
        outcomes = Driver(study, plans, folder, args.parallel).run_all()
    except KeyboardInterrupt:
        print(f"interrupted; continue with --resume {folder}", file=sys.stderr)
        sys.exit(130)
    from experiments.study_report import write_report

    command = " ".join(["python -m experiments.study", *argv])
    report = write_report(study, {name: p.tokens_per_step for name, p in plans.items()}, outcomes, folder, command)
    failed = [o for o in outcomes if o.status != "ok"]
    print(f"report: {report}" + (f" ({len(failed)} of {len(outcomes)} runs failed, see the report)" if failed else ""))
    return folder


if __name__ == "__main__":
    main()
