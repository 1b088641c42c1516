"""The study YAML (`experiments/configs/studies/<name>.yaml`), read and checked as a whole.

Every mistake the file can hold is found here, before anything trains, and reported as one
`ConfigError` naming the file and the key at fault. The format is described in docs/studies.md.
"""

from __future__ import annotations

import difflib
import re
from argparse import ArgumentError
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from callbacks.peak_flops import gpu_peak
from core.errors import ConfigError
from evaluation.suites import SUITES, group_name, metric_names, name_matches, parse_suites
from experiments.evaluate import build_parser
from lightning_modules.base import VALIDATION_METRICS

TOP_KEYS = {
    "name",
    "question",
    "baseline",
    "seeds",
    "budget_tokens",
    "allow_unequal_budgets",
    "args",
    "arms",
    "evaluate",
    "metrics",
    "sizes",
    "device",
}
ARM_KEYS = {"config", "args", "init_from", "budget_tokens", "compare", "evaluate_args"}
DIRECTIONS = ("higher", "lower")
DEFAULT_SIZE = "cpu"
OBJECTIVES = ("causal", "mlm")  # a decoder's and an encoder's: what an arm may train before its config is resolved
REFERENCE = re.compile(r"\$\{([^${}]*)\}")  # ${ARM} in an arm's args: ARM's run directory of the same seed


def references(tokens: Iterable[str]) -> list[str]:
    """The arms that the `${ARM}` references in `tokens` name, each once, in order."""
    return list(dict.fromkeys(name for token in tokens for name in REFERENCE.findall(token)))


def resolve_references(tokens: Iterable[str], runs: Mapping[str, str]) -> list[str]:
    """`tokens` with every `${ARM}` replaced by `runs[ARM]` (that arm's run directory)."""
    return [REFERENCE.sub(lambda match: runs[match.group(1)], token) for token in tokens]


@dataclass(frozen=True)
class Arm:
    """One arm: a run config plus overrides. `init_from` names the arm whose run of the same seed
    this one starts from (pre-train -> fine-tune); `${ARM}` in `args` is ARM's run directory of the
    same seed (e.g. a teacher); `compare: false` arms are trained for others to use but neither
    evaluated nor compared. `evaluate_args` are this arm's own `experiments.evaluate` tokens, where
    `${ARM}` is also ARM's run (e.g. the next-token run a second-to-last model is compared with)."""

    name: str
    config: str
    args: tuple[str, ...] = ()
    init_from: str | None = None
    budget_tokens: int | None = None
    compare: bool = True
    evaluate_args: tuple[str, ...] = ()

    @property
    def needs(self) -> dict[str, str]:
        """The arms whose same-seed runs this arm's run waits for, each with the key that names it."""
        needs = {} if self.init_from is None else {self.init_from: "init_from"}
        for key, tokens in (("args", self.args), ("evaluate_args", self.evaluate_args)):
            needs |= {name: f"{key}: ${{{name}}}" for name in references(tokens) if name not in needs}
        return needs


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    baseline: str
    seeds: tuple[int, ...]
    budget_tokens: int | None
    allow_unequal_budgets: bool
    args: tuple[str, ...]
    arms: dict[str, Arm]
    suites: tuple[str, ...]
    eval_args: tuple[str, ...]
    metrics: dict[str, str]  # metric -> "higher" | "lower": the direction that is better
    file: str
    size: str
    device: str | None = None  # the GPU a size is planned for (torch.cuda.get_device_name()); None: this machine

    @property
    def compared(self) -> list[str]:
        return [name for name, arm in self.arms.items() if arm.compare]

    def chain(self, arm: str) -> list[str]:
        """`arm` and the arms it starts from, the first pre-training first."""
        names = [arm]
        while (parent := self.arms[names[0]].init_from) is not None:
            names.insert(0, parent)
        return names

    def depth(self, arm: str) -> int:
        """How many runs deep `arm`'s run waits (0: it needs none); runs start in this order."""
        return max((1 + self.depth(need) for need in self.arms[arm].needs), default=0)


def cli_tokens(values: Any, where: str, errors: list[str]) -> tuple[str, ...]:
    """A YAML list of command-line tokens, as strings (`[--trainer.max_steps, 100]`)."""
    if values is None:
        return ()
    if not isinstance(values, list) or any(isinstance(v, (dict, list)) for v in values):
        errors.append(f"{where} must be a list of command-line tokens, got {values!r}")
        return ()
    return tuple("null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in values)


def positive_int(value: Any, where: str, errors: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        errors.append(f"{where} must be a positive integer, got {value!r}")
        return None
    return value


def seed_list(value: Any, where: str, errors: list[str]) -> tuple[int, ...]:
    """`n` -> seeds 0..n-1; a list -> those seeds."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            errors.append(f"{where} must be at least 1, got {value}")
            return ()
        return tuple(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
        and len(set(value)) == len(value)
    ):
        return tuple(value)
    errors.append(f"{where} must be a count >= 1 or a list of distinct non-negative integers, got {value!r}")
    return ()


def metric_error(metric: str, suites: tuple[str, ...]) -> str | None:
    """Why `metric` cannot be read from a study run's metrics.json, or None. A run writes its final
    validation as `val/<name>` and each evaluation suite as `eval/<suite>/<name>`."""
    group, _, rest = metric.partition("/")
    if group == "val" and rest:
        return None
    group_name, _, name = rest.partition("/")
    suite = group_name.partition("@")[0]  # eval/<suite>@<data>/<name>: the suite on other data
    if group != "eval" or suite not in SUITES or not name:
        return (
            f"metrics: unknown metric {metric!r} (a run's metrics.json holds val/<name> and eval/<suite>/<name>, "
            f"suites: {', '.join(SUITES)})"
        )
    if suite not in suites:
        return f"metrics: {metric!r}: no chosen suite produces it (evaluate.suites: {list(suites)}; add {suite!r})"
    return None


@cache
def evaluate_parser() -> ArgumentParser:
    """`experiments.evaluate`'s own parser, built once, raising instead of exiting."""
    parser = build_parser()
    parser.exit_on_error = False
    return parser


def evaluated_groups(suites: tuple[str, ...], tokens: tuple[str, ...]) -> dict[str, tuple[str, Any]]:
    """The result groups (`ppl`, `ppl@valid`, ...) that `experiments.evaluate --suites suites
    *tokens` writes, each with its suite and options, found by its own parser and `group_name`;
    ArgumentError or ConfigError when it would refuse the tokens. `${ARM}` stands for a run dir,
    unknown here: the arm's name takes its place."""
    tokens = tuple(resolve_references(tokens, {name: name for name in references(tokens)}))
    parser = evaluate_parser()
    config = parser.parse_args(["--run", ".", "--suites", ",".join(suites), *tokens])
    options = parser.instantiate(config)
    return {group_name(name, options[name]): (name, options[name]) for name in parse_suites(config.suites)}


def arm_evaluations(
    suites: tuple[str, ...], eval_args: tuple[str, ...], arms: dict[str, Arm], errors: list[str]
) -> dict[str, dict[str, tuple[str, Any]]]:
    """Per compared arm, the result groups its evaluation writes (the study's evaluate args, then the
    arm's evaluate_args, as `experiments.study` passes them); a refused token is an error."""
    parsed: dict[tuple[str, ...], dict[str, tuple[str, Any]]] = {}
    out = {}
    for arm in arms.values():
        if not arm.compare:
            continue
        if arm.evaluate_args not in parsed:  # arms without evaluate_args share the study's parse
            key = f"arms.{arm.name}.evaluate_args" if arm.evaluate_args else "evaluate.args"
            try:
                parsed[arm.evaluate_args] = evaluated_groups(suites, (*eval_args, *arm.evaluate_args))
            except (ArgumentError, ConfigError) as err:
                errors.append(f"{key}: experiments.evaluate refuses them: {' '.join(str(err).split())}")
                return {}
        out[arm.name] = parsed[arm.evaluate_args]
    return out


def group_error(metric: str, groups: set[str], size: str) -> str | None:
    """Why no evaluation of the study writes `metric` (an `eval/<group>/<name>` key), or None:
    an option that chooses other data puts a suite's results under `<suite>@<data>`."""
    group, _, name = metric.removeprefix("eval/").partition("/")
    if not metric.startswith("eval/") or group in groups:
        return None
    suite = group.partition("@")[0]
    written = sorted(g for g in groups if g.partition("@")[0] == suite)
    if not written:  # evaluate.args gave --suites without it
        return f"metrics.{metric}: no evaluation runs the {suite} suite with these evaluate args (size {size})"
    closest = difflib.get_close_matches(group, written, n=1, cutoff=0)[0]
    return (
        f"metrics.{metric}: the {suite} suite writes {' and '.join(f'eval/{g}/...' for g in written)} "
        f"with these evaluate args (size {size}), not eval/{group}/...: did you mean eval/{closest}/{name}?"
    )


def name_error(
    metric: str, evaluations: dict[str, dict[str, tuple[str, Any]]], objectives: Mapping[str, tuple[str, ...]]
) -> str | None:
    """Why no compared arm's run writes `metric` under its group, or None: each suite (and the final
    validation) says which names it writes for a model of each objective ("causal", "mlm"), so a
    misspelt name (`eval/needle/accc`, `val/pplx`) is refused before anything trains, naming the closest."""
    if metric.startswith("val/"):
        written = {f"val/{name}" for name in VALIDATION_METRICS}
        what = "a run's final validation writes"
    else:
        group = metric.removeprefix("eval/").partition("/")[0]
        written = {
            f"eval/{group}/{template}"
            for arm, groups in evaluations.items()
            if group in groups
            for objective in objectives[arm]
            for template in metric_names(*groups[group], objective)
        }
        what = f"the {group.partition('@')[0]} suite writes"
    if any(name_matches(template, metric) for template in written):
        return None
    models = sorted({objective for arm in evaluations for objective in objectives[arm]})
    listed = ", ".join(sorted(written)) or "nothing"
    hint = f": did you mean {closest_name(metric, written)}?" if written else ""
    return f"metrics.{metric}: no run writes it ({what} {listed} for these arms' {'/'.join(models)} models){hint}"


def closest_name(metric: str, written: set[str]) -> str:
    """The written name nearest `metric`, preferring one whose last part holds or is held in `metric`'s
    (`val/pplx` -> `val/ppl`, `eval/ppl/ppl` -> `eval/ppl/pseudo_ppl`, not the nearer spelling `eval/ppl/nll`)."""
    last = metric.rpartition("/")[2]
    related = [w for w in sorted(written) if last in (name := w.rpartition("/")[2]) or name in last]
    return difflib.get_close_matches(metric, related or sorted(written), n=1, cutoff=0)[0]


def metric_name_errors(study: Study, objectives: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Every study metric that no compared arm's run writes, given each arm's possible objectives
    (both before its config is resolved; its model's own after)."""
    errors: list[str] = []
    evaluations = arm_evaluations(study.suites, study.eval_args, study.arms, errors) if study.suites else {}
    return errors + [
        error
        for metric in study.metrics
        if not metric_error(metric, study.suites) and (error := name_error(metric, evaluations, objectives))
    ]


def read_arms(raw: Any, errors: list[str]) -> dict[str, Arm]:
    if not isinstance(raw, dict) or not raw:
        errors.append(f"arms must map arm names to {{config: ..., args: [...]}}, got {raw!r}")
        return {}
    arms = {}
    for name, spec in raw.items():
        where = f"arms.{name}"
        if not isinstance(spec, dict) or "config" not in spec:
            errors.append(f"{where} must be a mapping with a config, got {spec!r}")
            continue
        if unknown := sorted(set(spec) - ARM_KEYS):
            errors.append(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(ARM_KEYS))})")
        if not Path(str(spec["config"])).is_file():
            errors.append(f"{where}.config: {spec['config']!r} is not a file")
        if "/" in str(name) or not str(name).strip():
            errors.append(f"{where}: an arm name must be a non-empty word without '/'")
        compare = spec.get("compare", True)
        if not isinstance(compare, bool):
            errors.append(f"{where}.compare must be true or false, got {compare!r}")
        arms[str(name)] = Arm(
            str(name),
            str(spec["config"]),
            cli_tokens(spec.get("args"), f"{where}.args", errors),
            None if spec.get("init_from") is None else str(spec["init_from"]),
            positive_int(spec.get("budget_tokens"), f"{where}.budget_tokens", errors),
            compare is not False,
            cli_tokens(spec.get("evaluate_args"), f"{where}.evaluate_args", errors),
        )
        if spec.get("evaluate_args") and compare is False:
            errors.append(f"{where}.evaluate_args: a compare: false arm is not evaluated")
    errors += dependency_errors(arms)
    return arms


def dependency_errors(arms: dict[str, Arm]) -> list[str]:
    """Every arm an arm needs (`init_from`, `${ARM}`) must be an arm, and no run may wait for itself."""
    errors = [
        f"arms.{arm.name}.{key}: {need!r} is not an arm (arms: {', '.join(arms)})"
        for arm in arms.values()
        for need, key in arm.needs.items()
        if need not in arms
    ]
    if errors:
        return errors
    for arm in arms.values():
        if cycle := cycle_from(arms, [arm.name]):
            return [f"arms.{cycle[0]}.{arms[cycle[0]].needs[cycle[1]]}: the chain {' -> '.join(cycle)} is a cycle"]
    return []


def cycle_from(arms: dict[str, Arm], path: list[str]) -> list[str] | None:
    """A cycle of needs reachable from the end of `path`, from where it closes, or None."""
    for need in arms[path[-1]].needs:
        if need in path:
            return [*path[path.index(need) :], need]
        if cycle := cycle_from(arms, [*path, need]):
            return cycle
    return None


def resolve_size(raw: dict, size: str, file: str) -> dict:
    """The top level with the size's keys replacing it (`args` is appended instead)."""
    sizes = raw.get("sizes") or {}
    if not isinstance(sizes, dict):
        raise ConfigError(f"{file}: sizes must map size names to keys, got {sizes!r}")
    if size == DEFAULT_SIZE and size not in sizes:
        return raw
    if size not in sizes:
        known = ", ".join(dict.fromkeys([DEFAULT_SIZE, *sizes]))  # each once, when the file has a cpu size too
        raise ConfigError(f"{file}: --size {size!r} is not a size of this study (sizes: {known})")
    overrides = sizes[size] or {}
    if not isinstance(overrides, dict) or set(overrides) - (TOP_KEYS - {"name", "sizes"}):
        raise ConfigError(f"{file}: sizes.{size} must be a mapping of top-level keys other than name and sizes")
    merged = {**raw, **overrides}
    merged["args"] = [*(raw.get("args") or []), *(overrides.get("args") or [])]
    return merged


def load_study(path: str, size: str = DEFAULT_SIZE, seeds: int | None = None) -> Study:
    """The study in `path` at `size`; `seeds` (the --seeds option) replaces its seeds with 0..seeds-1."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: {path!r} is not a file")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a mapping of keys (name, arms, metrics, ...)")
    if unknown := sorted(set(raw) - TOP_KEYS):
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    raw = resolve_size(raw, size, path)
    errors: list[str] = []
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        errors.append(f"name must be a non-empty word without '/', got {name!r}")
    arms = read_arms(raw.get("arms"), errors)
    baseline = raw.get("baseline")
    if arms and (baseline not in arms or not arms[baseline].compare):
        errors.append(
            f"baseline: {baseline!r} is not a compared arm (arms: {', '.join(a for a in arms if arms[a].compare)})"
        )
    if seeds is not None:
        seed_values = seed_list(seeds, "--seeds", errors)
    else:
        seed_values = seed_list(raw.get("seeds", 3), "seeds", errors)
    evaluate = raw.get("evaluate") or {}
    if not isinstance(evaluate, dict) or set(evaluate) - {"suites", "args"}:
        errors.append(f"evaluate must be a mapping with suites and args, got {evaluate!r}")
        evaluate = {}
    suites = evaluate.get("suites") or []
    if not isinstance(suites, list) or (unknown := [s for s in suites if s not in SUITES]):
        errors.append(f"evaluate.suites: unknown suite(s) in {suites!r} (known: {', '.join(SUITES)})")
        suites = []
    metrics = raw.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        errors.append(f"metrics must map metric names to higher or lower, got {metrics!r}")
        metrics = {}
    for metric, direction in metrics.items():
        if direction not in DIRECTIONS:
            errors.append(f"metrics.{metric} must be higher or lower (the direction that is better), got {direction!r}")
        if error := metric_error(str(metric), tuple(suites)):
            errors.append(error)
    allow = raw.get("allow_unequal_budgets", False)
    if not isinstance(allow, bool):
        errors.append(f"allow_unequal_budgets must be true or false, got {allow!r}")
    device = raw.get("device")
    if device is not None and not (isinstance(device, str) and gpu_peak(device)):
        errors.append(f"device: {device!r} is not a GPU of callbacks/peak_flops.py (e.g. 'NVIDIA H200')")
    study = Study(
        name=str(name),
        question=str(raw.get("question") or ""),
        baseline=str(baseline),
        seeds=seed_values,
        budget_tokens=positive_int(raw.get("budget_tokens"), "budget_tokens", errors),
        allow_unequal_budgets=allow is True,
        args=cli_tokens(raw.get("args"), "args", errors),
        arms=arms,
        suites=tuple(suites),
        eval_args=cli_tokens(evaluate.get("args"), "evaluate.args", errors),
        metrics={str(k): v for k, v in metrics.items()},
        file=str(path),
        size=size,
        device=device if isinstance(device, str) else None,
    )
    if shared := references(study.args):
        errors.append(
            f"args: ${{{shared[0]}}}: an arm's run can be referred to in arm args only "
            f"(the study's args reach every arm, {shared[0]!r} too)"
        )
    if shared := references(study.eval_args):
        errors.append(
            f"evaluate.args: ${{{shared[0]}}}: an arm's run can be referred to in an arm's evaluate_args only "
            f"(evaluate.args reach every arm, {shared[0]!r} too)"
        )
    if study.suites and (evaluations := arm_evaluations(study.suites, study.eval_args, arms, errors)):
        groups = {group for written in evaluations.values() for group in written}
        for metric in study.metrics:
            if not metric_error(metric, study.suites) and (error := group_error(metric, groups, size)):
                errors.append(error)
    if not errors:
        errors += metric_name_errors(study, {arm: OBJECTIVES for arm in study.compared})
    if errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    return study
