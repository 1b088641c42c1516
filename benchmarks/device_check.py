"""One GPU visit, one command: everything masklab does on a GPU, checked and measured within a budget.

    python -m benchmarks.device_check [--budget 540] [--out device_check] [--wheels DIR]
        [--study experiments/configs/studies/<name>.yaml --size gpu10] [--shape paper|tiny]

A GPU is lent to this project now and then for minutes, so the visit is one prepared script that
spends them in order of value and always leaves a report. Stages, each in its own process:

1. ``install`` (with ``--wheels``): the project's extras that the device lacks, installed offline
   from carried wheels (the device reaches no package index); the time it took is reported.
2. ``env``: device name, driver, torch / CUDA / transformers / lightning / liger-kernel versions.
3. ``tests``: ``tests/test_gpu_path.py`` with the tiny CLI runs on the GPU
   (``MASKLAB_TEST_ACCELERATOR=gpu``): every shipped config trains ``--config-steps`` steps in bf16
   with fused AdamW and its own clipping, plus the CUDA-only parity tests (Liger, SDPA-DeBERTa).
4. ``study`` (with ``--study``): one study at a size sized for the visit, run beside the tests.
5. ``suite``: ``python -m benchmarks.gpu --suite``, alone on the device, with what is left.

Stages 3 and 4 share the first ``--share`` of the budget; the suite gets the rest. A stage that
outruns its deadline is stopped and reported as cut; a stage that could not start says so.
Everything goes to ``--out``: ``summary.md`` (rewritten after every stage, so even a visit cut
from outside leaves one), ``suite.md``, ``tests.xml`` and one log per stage. On a CPU,
``--shape tiny`` runs the same stages at the tiny shape (CI does, ``tests/test_device_check.py``).
This file imports nothing of masklab: it runs before the carried packages are installed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_REPORT = """
import importlib.metadata as md, importlib.util, torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")
print("torch:", torch.__version__, "| CUDA:", torch.version.cuda, "| cuDNN:", torch.backends.cudnn.version())
for name in ("transformers", "lightning", "datasets", "jsonargparse", "liger-kernel", "triton"):
    print(f"{name}:", md.version(name) if importlib.util.find_spec(name.replace("-", "_")) else "not installed")
"""


@dataclass
class Stage:
    """One step of the visit: a command, its extra environment, and how it went."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    status: str = "not started"
    started: float = 0.0  # perf_counter() at its start
    seconds: float = 0.0  # how long it ran
    note: str = ""


@dataclass
class Visit:
    """The stages of one visit, their outcomes, and where they are written."""

    out: Path
    budget: float
    started: float = field(default_factory=time.perf_counter)
    stages: list[Stage] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def log(self, stage: Stage) -> Path:
        return self.out / f"{stage.name}.log"


def start(visit: Visit, stage: Stage) -> subprocess.Popen | None:
    """Launch `stage` in its own process group (so a cut stops its children too), or None when
    the budget is already spent."""
    if visit.left() <= 0:
        stage.status, stage.note = "not started", "budget spent"
        return None
    with visit.log(stage).open("w") as log:  # the process writes through its own copy of the file
        log.write(f"$ {shlex.join(stage.command)}\n")
        log.flush()
        stage.status, stage.started = "running", time.perf_counter()
        return subprocess.Popen(
            stage.command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **visit.env, **stage.env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def finish(visit: Visit, running: dict[str, tuple[Stage, subprocess.Popen]], deadline: float) -> None:
    """Wait for every process in `running` until `deadline` (seconds since the visit started);
    those still running then are stopped (SIGTERM, then SIGKILL) and marked cut."""
    while running:
        for name, (stage, process) in list(running.items()):
            code = process.poll()
            if code is not None:
                stage.status = "ok" if code == 0 else f"failed (exit {code})"
                stage.seconds = time.perf_counter() - stage.started
                del running[name]
        if running and time.perf_counter() - visit.started >= deadline:
            for stage, process in running.values():
                stop(process)
                stage.status = f"cut at {deadline:.0f} s of the budget"
                stage.seconds = time.perf_counter() - stage.started
            running.clear()
        time.sleep(0.2)
    write_summary(visit)


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_stages(visit: Visit, stages: list[Stage], deadline: float) -> None:
    """Run `stages` side by side until `deadline` (seconds since the visit started)."""
    visit.stages.extend(stages)
    running = {stage.name: (stage, process) for stage in stages if (process := start(visit, stage)) is not None}
    finish(visit, running, deadline)


def junit_outcomes(xml: Path) -> list[tuple[str, str, float]]:
    """(test, outcome, seconds) of every test in a pytest JUnit XML file."""
    if not xml.is_file():
        return []
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                message = (child.get("message") or "").strip().splitlines()
                outcome = f"{child.tag}: {message[0][:160] if message else ''}".replace("|", "/")
        rows.append((case.get("name", "?"), outcome, float(case.get("time", 0))))
    return rows


def write_summary(visit: Visit) -> None:
    """summary.md: the stages, the environment, the tests and the suite's table, as far as run."""
    lines = [f"# device check, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    env_log = visit.out / "env.log"
    if env_log.is_file():  # what the report printed, after the command line(s)
        report = env_log.read_text().partition("\ndevice:")[2]
        lines += ["```", f"device:{report}".rstrip(), "```", ""] if report else []
    lines += ["| stage | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for stage in visit.stages:
        seconds = "" if stage.status in ("running", "not started") else f"{stage.seconds:.1f}"
        lines.append(f"| {stage.name} | {stage.status} | {seconds} | {stage.note} |")
    tests = junit_outcomes(visit.out / "tests.xml")
    if tests:
        passed = sum(outcome == "passed" for _, outcome, _ in tests)
        lines += ["", f"tests: {passed} of {len(tests)} passed", "", "| test | outcome | s |", "| --- | --- | ---: |"]
        lines += [f"| {name} | {outcome} | {seconds:.1f} |" for name, outcome, seconds in tests]
    suite = visit.out / "suite.md"
    if suite.is_file():
        lines += ["", suite.read_text().rstrip()]
    (visit.out / "summary.md").write_text("\n".join(lines) + "\n")


def build_stages(args: argparse.Namespace, visit: Visit) -> tuple[list[Stage], list[Stage], list[Stage]]:
    """(setup, side by side, suite) stages of the visit."""
    python = sys.executable
    setup = []
    if args.wheels:
        site = visit.out / "site"
        visit.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
        setup.append(
            Stage(
                "install",
                [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *wheels],
            )
        )
    setup.append(Stage("env", [python, "-c", ENV_REPORT]))
    tests = Stage(
        "tests",
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(["-n", str(args.test_workers)] if args.test_workers > 1 else []),
            f"--junitxml={visit.out / 'tests.xml'}",
            *(["-k", args.tests_filter] if args.tests_filter else []),
            "tests/test_gpu_path.py",
        ],
        env={
            "MASKLAB_TEST_ACCELERATOR": "gpu" if args.shape == "paper" else "cpu",
            "MASKLAB_TEST_STEPS": str(args.config_steps),
        },
    )
    side_by_side = [tests]
    if args.study:
        side_by_side.append(
            Stage(
                "study",
                [
                    python,
                    "-m",
                    "experiments.study",
                    "--config",
                    args.study,
                    "--size",
                    args.size,
                    "--parallel",
                    str(args.study_parallel),
                    "--studies_dir",
                    str(visit.out / "studies"),
                    *args.study_args,
                ],
            )
        )
    suite = Stage(
        "suite",
        [python, "-m", "benchmarks.gpu", "--suite", "--table-out", str(visit.out / "suite.md"), *args.suite_args],
    )
    if args.shape == "tiny":
        suite.command += ["--shape", "tiny", "--steps", "2", "--skip", "1", "--precision", "32-true"]
    return setup, side_by_side, [suite]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole visit (default: 540)")
    parser.add_argument(
        "--share", type=float, default=0.4, help="share of the budget for the tests and the study (default: 0.4)"
    )
    parser.add_argument("--out", default="device_check", help="folder for the report and logs (default: device_check)")
    parser.add_argument("--wheels", help="a folder of wheels to install offline first (the extras the device lacks)")
    parser.add_argument(
        "--shape", choices=["paper", "tiny"], default="paper", help="paper: on the GPU; tiny: the CPU smoke test"
    )
    parser.add_argument("--config-steps", type=int, default=20, help="steps each shipped config trains (default: 20)")
    parser.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers for the tests (default: 8)")
    parser.add_argument("--tests-filter", help="pytest -k expression: a subset of tests/test_gpu_path.py")
    parser.add_argument("--study", help="a study YAML to run beside the tests")
    parser.add_argument("--size", default="gpu10", help="the study's size (default: gpu10)")
    parser.add_argument("--study-parallel", type=int, default=6, help="the study's runs at once (default: 6)")
    parser.add_argument(
        "--study-args", type=shlex.split, default=[], help="more experiments.study options, one quoted string"
    )
    parser.add_argument(
        "--suite-args", type=shlex.split, default=[], help="more benchmarks.gpu options, one quoted string"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stages: Callable[..., tuple] = build_stages) -> Visit:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    visit = Visit(out, args.budget)
    setup, side_by_side, suite = stages(args, visit)
    for stage in setup:  # in order: the install must end before anything imports the packages
        run_stages(visit, [stage], deadline=args.budget)
    run_stages(visit, side_by_side, deadline=args.budget * args.share)
    for stage in suite:
        suite_budget = max(0.0, visit.left() - 60)  # no new row in the last minute: a row takes up to one
        stage.command += ["--budget", f"{suite_budget:.0f}"]
        run_stages(visit, [stage], deadline=args.budget)
    write_summary(visit)
    print((out / "summary.md").read_text())
    return visit


if __name__ == "__main__":
    main()
