"""The study driver: bad input, the report on hand-made metrics, resume, a failing arm, --dry-run,
and one tiny 2-arm x 2-seed study end to end."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.collections import LineCollection
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.errors import ConfigError
from experiments import study as driver
from experiments.stats import Estimate
from experiments.study import ArmPlan, Driver, Outcome, main
from experiments.study_config import load_study
from experiments.study_report import RunResult, curve_panels, learning_curves, metric_bars, whiskers, write_report
from tests.conftest import TINY

NTP, MEAP = "experiments/configs/ntp.yaml", "experiments/configs/meap.yaml"


def write_study(folder: Path, **overrides) -> str:
    study = {
        "name": "tiny",
        "question": "Does MEAP beat NTP?",
        "baseline": "ntp",
        "seeds": 2,
        "args": [*TINY, "--trainer.callbacks", None, "--data.cache_dir", str(folder / "cache")],
        "arms": {"ntp": {"config": NTP}, "meap": {"config": MEAP}},
        "metrics": {"val/loss": "lower", "val/acc": "higher"},
        **overrides,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


@pytest.mark.parametrize(
    "overrides, argv, message",
    [
        (
            {"arms": {"ntp": {"config": "experiments/configs/nope.yaml"}}},
            [],
            "arms.ntp.config: 'experiments/configs/nope.yaml' is not a file",
        ),
        ({"metrics": {"val_loss": "lower"}}, [], "metrics: unknown metric 'val_loss'"),
        ({"metrics": {"eval/bleu/acc": "higher"}}, [], "metrics: unknown metric 'eval/bleu/acc'"),
        (
            {"metrics": {"eval/needle/acc": "higher"}, "evaluate": {"suites": ["retrieval"]}},
            [],
            "'eval/needle/acc': no chosen suite produces it",
        ),
        (
            {
                "metrics": {"eval/ppl/ppl": "lower"},
                "evaluate": {"suites": ["ppl"], "args": ["--ppl.text", "a/valid.txt"]},
            },
            [],
            "metrics.eval/ppl/ppl: the ppl suite writes eval/ppl@valid/... with these evaluate args (size cpu), "
            "not eval/ppl/...: did you mean eval/ppl@valid/ppl?",
        ),
        ({"device": "NVIDIA Foo 9000"}, [], "device: 'NVIDIA Foo 9000' is not a GPU of callbacks/peak_flops.py"),
        ({"seeds": 0}, [], "seeds must be at least 1, got 0"),
        ({}, ["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (
            {"arms": {"ntp": {"config": NTP}, "meap": {"config": MEAP, "args": ["--trainer.max_steps", 8]}}},
            [],
            "the compared arms train different numbers of tokens (ntp=512, meap=1,024)",
        ),
    ],
    ids=[
        "missing config",
        "unknown metric",
        "unknown suite",
        "metric of no chosen suite",
        "metric of a group its evaluation does not write",
        "unknown device",
        "seeds 0",
        "--seeds 0",
        "unequal budgets",
    ],
)
def test_bad_input_is_one_line_before_anything_trains(tmp_path, capsys, monkeypatch, overrides, argv, message):
    monkeypatch.setattr(driver, "launch", lambda *a: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", write_study(tmp_path, **overrides), "--studies_dir", str(tmp_path / "studies"), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "studies").exists()


def test_dry_run_refuses_a_metric_name_no_run_writes_naming_the_closest(tmp_path):
    """Issue 21.10, through the real entry point: a misspelt suite metric and a misspelt validation
    metric are refused before anything trains (they used to pass as "every config is valid")."""
    metrics = {"eval/needle/accc": "higher", "val/pplx": "lower", "eval/retrieval/kv/acc_position_3": "higher"}
    config = write_study(tmp_path, evaluate={"suites": ["needle", "retrieval"]}, metrics=metrics)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.study", "--config", config, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "every config is valid" not in result.stdout
    assert "metrics.eval/needle/accc: no run writes it (the needle suite writes eval/needle/acc, " in result.stderr
    assert "did you mean eval/needle/acc?" in result.stderr
    assert "metrics.val/pplx: no run writes it (a run's final validation writes val/acc, val/loss, val/ppl" in (
        result.stderr
    )
    assert "did you mean val/ppl?" in result.stderr
    assert "acc_position_3" not in result.stderr  # a placeholder name (`kv/acc_position_<p>`) matches


def test_a_metric_only_the_other_objective_writes_is_refused_once_the_arms_models_are_known(tmp_path, monkeypatch):
    """eval/ppl/ppl is a decoder's; encoder arms write eval/ppl/pseudo_ppl. Before the arms' configs are
    resolved either objective may write it; the plan knows the models and refuses it."""
    monkeypatch.setattr(driver, "launch", lambda *a: pytest.fail("a run was started"))
    mlm = {
        "random": {"config": "experiments/configs/mlm_random.yaml"},
        "amlm": {"config": "experiments/configs/amlm_hard.yaml"},
    }
    config = write_study(
        tmp_path, arms=mlm, baseline="random", evaluate={"suites": ["ppl"]}, metrics={"eval/ppl/ppl": "lower"}
    )
    study = load_study(config)  # either objective could write it
    with pytest.raises(ConfigError) as error:
        driver.plan(study, 1e9)
    assert error.value.errors == [
        f"{config}: metrics.eval/ppl/ppl: no run writes it (the ppl suite writes eval/ppl/nll, "
        "eval/ppl/pseudo_ppl for these arms' mlm models): did you mean eval/ppl/pseudo_ppl?"
    ]


def test_an_unknown_size_lists_each_size_once(tmp_path):
    path = write_study(tmp_path, sizes={"cpu": {"seeds": 3}, "gpu": {"seeds": 5}})
    with pytest.raises(ConfigError, match=r"--size 'tpu' is not a size of this study \(sizes: cpu, gpu\)$"):
        load_study(path, size="tpu")


def test_unequal_budgets_pass_when_allowed_and_a_budget_sets_the_steps(tmp_path):
    arms = {"ntp": {"config": NTP}, "meap": {"config": MEAP, "args": ["--data.batch_size", 8]}}
    allowed = load_study(write_study(tmp_path, arms=arms, allow_unequal_budgets=True))
    plans = driver.plan(allowed, 1e9)
    assert (plans["ntp"].tokens, plans["meap"].tokens) == (4 * 4 * 32, 4 * 8 * 32)  # TINY: 4 steps, blocks of 32
    budget = load_study(write_study(tmp_path, arms=arms, budget_tokens=1000))
    plans = driver.plan(budget, 1e9)
    # 4 x 32 = 128 tokens a step -> ceil(1000 / 128) = 8 steps; 8 x 32 = 256 -> 4 steps
    assert (plans["ntp"].max_steps, plans["meap"].max_steps) == (8, 4)


def test_a_broken_study_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"arms.sft.init_from: 'pre' is not an arm"):
        load_study(write_study(tmp_path, arms={"ntp": {"config": NTP}, "sft": {"config": NTP, "init_from": "pre"}}))
    with pytest.raises(ConfigError, match=r"baseline: 'gpt' is not a compared arm"):
        load_study(write_study(tmp_path, baseline="gpt"))
    with pytest.raises(ConfigError, match=r"--size 'tpu' is not a size of this study"):
        load_study(write_study(tmp_path), size="tpu")


def test_a_metric_must_be_under_a_group_that_its_evaluation_writes(tmp_path):
    """Options that choose other data tag the group (`ppl@valid`); an arm's evaluate_args add its
    own groups, its `${ARM}` standing in for a run dir; each size is checked with its own args."""
    evaluate = {
        "suites": ["ppl", "needle", "glue"],
        "args": ["--ppl.text", "data/valid.txt", "--glue.tasks", "[rte,cola,mrpc]", "--glue.data_dir", "glue"],
    }
    arms = {"ntp": {"config": NTP}, "meap": {"config": MEAP, "evaluate_args": ["--needle.haystack", "${ntp}/essays"]}}
    good = {"eval/ppl@valid/ppl": "lower", "eval/glue@cola+mrpc+rte/score": "higher", "eval/needle/acc": "higher"}
    bad = {"eval/ppl/ppl": "lower", "eval/glue/score": "higher", "eval/needle@essay/acc": "higher", "val/acc": "higher"}
    sizes = {"gpu": {"metrics": bad}}
    path = write_study(
        tmp_path, arms=arms, evaluate=evaluate, metrics={**good, "eval/needle@essays/acc": "higher"}, sizes=sizes
    )
    assert load_study(path).metrics == {**good, "eval/needle@essays/acc": "higher"}
    with pytest.raises(ConfigError) as error:
        load_study(path, size="gpu")
    assert error.value.errors == [
        f"{path}: metrics.eval/ppl/ppl: the ppl suite writes eval/ppl@valid/... with these evaluate args (size gpu), "
        "not eval/ppl/...: did you mean eval/ppl@valid/ppl?",
        f"{path}: metrics.eval/glue/score: the glue suite writes eval/glue@cola+mrpc+rte/... with these evaluate args "
        "(size gpu), not eval/glue/...: did you mean eval/glue@cola+mrpc+rte/score?",
        f"{path}: metrics.eval/needle@essay/acc: the needle suite writes eval/needle/... and eval/needle@essays/... "
        "with these evaluate args (size gpu), not eval/needle@essay/...: did you mean eval/needle@essays/acc?",
    ]
    # the default four tasks, in another order, are the default data: the group is untagged
    default = {"suites": ["glue"], "args": ["--glue.tasks", "[sst2,cola,rte,mrpc]"]}
    study = load_study(write_study(tmp_path, evaluate=default, metrics={"eval/glue/score": "higher"}))
    assert study.metrics == {"eval/glue/score": "higher"}
    # tokens experiments.evaluate would refuse are refused here, naming the key that holds them
    with pytest.raises(ConfigError) as error:
        load_study(write_study(tmp_path, evaluate={"suites": ["ppl"], "args": ["--ppl.txt", "a"]}))
    assert error.value.errors == [
        f"{path}: evaluate.args: experiments.evaluate refuses them: unrecognized arguments: --ppl.txt a"
    ]
    arms["meap"]["evaluate_args"] = ["--needle.depths", "many"]
    with pytest.raises(
        ConfigError, match=r"arms.meap.evaluate_args: experiments.evaluate refuses them: .*many"
    ) as error:
        load_study(write_study(tmp_path, arms=arms, evaluate={"suites": ["needle"]}))
    assert len(error.value.errors) == 1


@pytest.mark.parametrize(
    "arms, args, message",
    [
        (
            {"ntp": {"config": NTP, "args": ["--data.init_args.tokenizer_path", "${big}/hf_model"]}},
            [],
            r"arms.ntp.args: \$\{big\}: 'big' is not an arm \(arms: ntp\)",
        ),
        (
            {"ntp": {"config": NTP, "args": ["--model.init_args.init_from", "${ntp}"]}},
            [],
            r"arms.ntp.args: \$\{ntp\}: the chain ntp -> ntp is a cycle",
        ),
        (
            {
                "ntp": {"config": NTP, "init_from": "meap"},
                "meap": {"config": MEAP, "args": ["--trainer.callbacks", "[{teacher_path: ${ntp}/hf_model}]"]},
            },
            [],
            r"arms.ntp.init_from: the chain ntp -> meap -> ntp is a cycle",
        ),
        (
            {"ntp": {"config": NTP}},
            ["--data.init_args.tokenizer_path", "${ntp}/hf_model"],
            r"args: \$\{ntp\}: an arm's run can be referred to in arm args only",
        ),
    ],
    ids=["no such arm", "itself", "a cycle through init_from", "in the study args"],
)
def test_a_bad_arm_reference_names_the_key(tmp_path, arms, args, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_study(write_study(tmp_path, arms=arms, args=args))
    assert len(error.value.errors) == 1


def test_a_reference_is_the_same_seed_run_of_the_arm_it_names(tmp_path, monkeypatch):
    distil = ["--data.init_args.tokenizer_path", "${big}/hf_model", "--data.init_args.cache_dir", "${big}-${ntp}"]
    arms = {
        "kd": {"config": NTP, "args": distil},  # listed before the arm it needs: the driver orders them
        "big": {"config": NTP, "compare": False},
        "ntp": {"config": NTP},
    }
    study = load_study(write_study(tmp_path, arms=arms, baseline="ntp"))
    assert study.arms["kd"].needs == {"big": "args: ${big}", "ntp": "args: ${ntp}"} and study.depth("kd") == 1
    config = driver.resolved_config(study, study.arms["kd"])  # the plan: a stand-in for the run not trained yet
    assert config["data"]["init_args"]["tokenizer_path"] == "runs/big/seed_0/version_0/hf_model"
    calls: list = []
    monkeypatch.setattr(driver, "launch", fake_launch(calls))
    outcomes = Driver(study, fake_plans(study), tmp_path, parallel=2).run_all()
    assert all(o.status == "ok" for o in outcomes)
    trained = [c[c.index("--experiment") + 1] for c in calls if "--experiment" in c]
    assert trained.index("kd/seed_1") > trained.index("big/seed_1")
    kd = next(c for c in calls if "kd/seed_1" in c)
    big = str(tmp_path / "runs" / "big" / "seed_1" / "version_0")
    ntp = str(tmp_path / "runs" / "ntp" / "seed_1" / "version_0")
    assert kd[kd.index("--data.init_args.tokenizer_path") + 1] == f"{big}/hf_model"
    assert kd[kd.index("--data.init_args.cache_dir") + 1] == f"{big}-{ntp}"
    assert "--model.init_args.init_from" not in kd  # a reference is not init_from
    calls.clear()
    monkeypatch.setattr(driver, "launch", fake_launch(calls, broken="big"))
    outcomes = Driver(study, fake_plans(study), tmp_path / "again", parallel=1).run_all()
    assert {o.error for o in outcomes if o.arm == "kd"} == {
        f"the run it refers to (big seed {s}) failed" for s in (0, 1)
    }


def test_a_size_replaces_top_level_keys_and_appends_args(tmp_path):
    path = write_study(tmp_path, sizes={"gpu": {"seeds": [3, 5], "args": ["--trainer.precision", "bf16-mixed"]}})
    gpu = load_study(path, size="gpu")
    assert gpu.seeds == (3, 5) and gpu.args[-2:] == ("--trainer.precision", "bf16-mixed")
    assert load_study(path).seeds == (0, 1) and load_study(path, seeds=4).seeds == (0, 1, 2, 3)
    assert load_study(write_study(tmp_path, sizes={"cpu": {"seeds": 5}})).seeds == (0, 1, 2, 3, 4)  # the default size


def fake_run(folder: Path, arm: str, seed: int, metrics: dict, needle_group: str = "needle") -> Outcome:
    run = folder / "runs" / arm / f"seed_{seed}" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "eval").mkdir()
    needle = {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "exact_match": [[seed / 3, 1.0]] * 3}
    (run / "eval" / f"{needle_group}.json").write_text(json.dumps(needle))
    return Outcome(arm, seed, "ok", str(run), train_s=10.0, eval_s=2.0, tokens=512)


def test_report_on_hand_made_metrics(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            seeds=3,
            evaluate={"suites": ["retrieval", "needle"]},
            metrics={"eval/retrieval/acc": "higher", "val/loss": "lower"},
        )
    )
    # ntp 1, 2, 3 and meap 2.0, 3.1, 4.2: paired differences 1.0, 1.1, 1.2 (worked out in test_stats)
    outcomes = [
        fake_run(
            tmp_path, arm, seed, {"eval/retrieval/acc": acc, "val/loss": acc, "eval/retrieval/kv/acc_position_1": 0.5}
        )
        for arm, values in (("ntp", [1.0, 2.0, 3.0]), ("meap", [2.0, 3.1, 4.2]))
        for seed, acc in enumerate(values)
    ]
    outcomes.append(Outcome("meap", 3, "failed", error="training: error: data: boom"))
    report = write_report(
        study, {"ntp": 128, "meap": 128}, outcomes, tmp_path, "python -m experiments.study ..."
    ).read_text()
    acc, loss = report.split("## eval/retrieval/acc (higher is better)")[1].split("## val/loss (lower is better)")
    # meap: mean 3.1, sd 1.1, half-width 4.303 * 1.1 / sqrt(3) = 2.733; ntp: mean 2, sd 1, half-width 2.484
    assert "| ntp (baseline) | 3 | 2 ± 2.48 | [-0.4841, 4.484] | – | – | – |" in acc
    assert "| meap | 3 | 3.1 ± 2.73 | [0.3674, 5.833] | +1.1 [+0.8516, +1.348] | 3 | better |" in acc
    assert "| +1.1 [+0.8516, +1.348] | 3 | worse |" in loss  # the same numbers, where lower is better
    assert "| meap | 3 | training: error: data: boom |" in report
    assert "| ntp | 3 | 512 | 10 s | 2 s |" in report  # the cost table
    assert "Every run scored" not in report
    # a metric on which every run scored the same is called out
    zeros = [
        fake_run(tmp_path / "zeros", arm, seed, {"eval/retrieval/acc": 0.0, "val/loss": 1.0 + seed})
        for arm in ("ntp", "meap")
        for seed in range(3)
    ]
    text = write_report(study, {"ntp": 128, "meap": 128}, zeros, tmp_path / "zeros", "...").read_text()
    assert text.count("Every run scored") == 1  # val/loss differs between seeds
    assert "Every run scored 0: this comparison answers nothing at this size." in text
    assert "one seed sets the model initialisation, the data order and the masks together" in report.lower()
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["arm"], r["seed"], r["status"]) for r in rows][-2:] == [("meap", "2", "ok"), ("meap", "3", "failed")]
    assert rows[4]["eval/retrieval/acc"] == "3.1" and rows[0]["tokens_seen"] == "512"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [  # no TensorBoard events: no learning curves
        "metrics.png",
        "needle.png",
        "retrieval_by_position.png",
    ]


def test_the_report_gives_each_runs_learning_step_on_the_main_metric(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    study = load_study(
        write_study(
            tmp_path, evaluate={"suites": ["recall"]}, metrics={"eval/recall/acc": "higher", "val/loss": "lower"}
        )
    )
    curves = {("ntp", 0): [0.1, 0.55, 0.95], ("ntp", 1): [0.2, 0.4, 0.6], ("meap", 0): [0.1, 0.2, 0.3]}
    outcomes = []
    for (arm, seed), values in curves.items():
        outcomes.append(fake_run(tmp_path, arm, seed, {"eval/recall/acc": values[-1], "val/loss": 1.0}))
        with SummaryWriter(outcomes[-1].run_dir) as writer:
            for step, value in zip((250, 500, 750), values):
                writer.add_scalar("eval/recall/acc", value, step)
                writer.add_scalar("val/acc", value, step)  # the objective's own: no learning-step claim
    outcomes.append(fake_run(tmp_path, "meap", 1, {"eval/recall/acc": 0.5, "val/loss": 1.0}))  # no curve: no row
    report = write_report(study, {"ntp": 128, "meap": 128}, outcomes, tmp_path, "...").read_text()
    table = report.split("## Learning steps: eval/recall/acc")[1].split("## Cost")[0]
    assert "| ntp | 0 | 500 | 750 | 750 | 0.950 |" in table and "| ntp | 1 | 750 | never | 750 | 0.600 |" in table
    assert "| meap | 0 | never | never | 750 | 0.300 |" in table and "| meap | 1 |" not in table
    for name, metric in (("loss", "val/loss"), ("objective", "val/acc")):  # not a suite's proportion: no table
        (tmp_path / name).mkdir()
        plain = load_study(write_study(tmp_path / name, metrics={metric: "lower"}))
        assert "Learning steps" not in write_report(plain, {"ntp": 128}, outcomes, tmp_path, "...").read_text()


def test_recall_curves_are_drawn_during_training_with_the_chance_level_the_suite_wrote(tmp_path):
    """The recall claims are about learning faster: the learning-curve figure gets a panel per suite metric
    evaluated during training, and both figures mark the 1/pairs the recall suite wrote as chance."""
    from torch.utils.tensorboard import SummaryWriter

    metrics = {"eval/recall/acc": "higher", "val/loss": "lower"}
    study = load_study(write_study(tmp_path, evaluate={"suites": ["recall"]}, metrics=metrics))
    curves = {("ntp", 0): [0.1, 0.5], ("ntp", 1): [0.2, 0.9], ("meap", 0): [0.1, 0.2], ("meap", 1): [0.1, 0.4]}
    results = []
    for (arm, seed), values in curves.items():
        final = {"eval/recall/acc": values[-1], "eval/recall/chance": 0.125, "val/loss": 1.0}
        run = fake_run(tmp_path, arm, seed, final)
        with SummaryWriter(run.run_dir) as writer:
            for step, value in zip((250, 500), values):
                writer.add_scalar("train/loss", 3.0 - value, step)
                writer.add_scalar("eval/recall/acc", value, step)
        results.append(RunResult(arm, seed, "ok", final, run_dir=Path(run.run_dir)))
    axes = {ax.get_ylabel(): ax for ax in learning_curves(study, results, {"ntp": 128, "meap": 128}).axes}
    recall_ax = axes["eval/recall/acc"]
    mean_lines = [line for line in recall_ax.get_lines() if line.get_linestyle() == "-"]
    assert [list(line.get_ydata()) for line in mean_lines] == [pytest.approx([0.15, 0.7]), pytest.approx([0.1, 0.3])]
    chance = lambda ax: [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert chance(recall_ax) == [0.125] and chance(axes["train/loss"]) == []
    assert chance(metric_bars(study, results).axes[0]) == [0.125]
    results[-1].metrics["eval/recall/chance"] = 0.25  # runs of different pair counts share no chance level
    assert chance(metric_bars(study, results).axes[0]) == []


def test_the_report_gives_the_holm_adjusted_verdict_beside_each_comparisons_own(tmp_path):
    """Two comparisons that are "better" alone (paired differences 1.0, 1.5, 2.0: p = 0.0351 each, worked out
    in test_stats) are not after Holm over the study's two comparisons (2 x 0.0351 = 0.0702)."""
    study = load_study(write_study(tmp_path, seeds=3, metrics={"val/acc": "higher", "val/ppl": "lower"}))
    outcomes = [
        fake_run(tmp_path, arm, seed, {"val/acc": value, "val/ppl": -value})
        for arm, values in (("ntp", [1.0, 2.0, 3.0]), ("meap", [2.0, 3.5, 5.0]))
        for seed, value in enumerate(values)
    ]
    report = write_report(study, {"ntp": 128, "meap": 128}, outcomes, tmp_path, "...").read_text()
    assert "This study makes 2 comparisons" in report
    assert "| Holm-adjusted p | adjusted verdict |" in report
    assert (
        report.count("| +1.5 [+0.2579, +2.742] | 3 | better | 0.0702 | no difference detected (Holm, 2 comparisons) |")
        == 1
    )
    assert "| ntp (baseline) | 3 | 2 ± 2.48 | [-0.4841, 4.484] | – | – | – | – | – |" in report


def test_report_plots_the_groups_the_study_compares_when_evaluate_args_name_other_data(tmp_path):
    """`--needle.haystack essays` writes eval/needle@essays.json and eval/retrieval@kv/... keys: the heatmaps and
    the by-position plot read those groups, not the untagged ones."""
    study = load_study(
        write_study(
            tmp_path,
            seeds=2,
            evaluate={
                "suites": ["retrieval", "needle"],
                "args": ["--needle.haystack", "essays", "--retrieval.data", "kv.jsonl"],
            },
            metrics={"eval/needle@essays/acc": "higher", "eval/retrieval@kv/acc": "higher"},
        )
    )
    outcomes = [
        fake_run(tmp_path, arm, seed, {"eval/retrieval@kv/kv/acc_position_1": 0.5}, needle_group="needle@essays")
        for arm in ("ntp", "meap")
        for seed in range(2)
    ]
    write_report(study, {"ntp": 128, "meap": 128}, outcomes, tmp_path, "...")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "metrics.png",
        "needle.png",
        "retrieval_by_position.png",
    ]


def test_whiskers_stay_in_the_range_a_metric_can_take():
    wide = Estimate(3, 0.05, 0.1, -0.2, 0.3)  # a t interval over 3 seeds reaching below 0
    assert whiskers("val/acc", wide) == (0.0, 0.3) and whiskers("eval/entropy/acc_last", wide) == (0.0, 0.3)
    assert whiskers("eval/ppl/pseudo_ppl", Estimate(3, 74, 30, -8.2, 156)) == (1.0, 156)
    assert whiskers("val/loss", wide) == (-0.2, 0.3)  # a loss interval is drawn as it is


def test_the_metric_figure_logs_perplexities_marks_the_unigram_level_and_clips_accuracy(tmp_path):
    """Issue 21.17 on the penultimate study's spread: pseudo-perplexities from 1e2 to 1e6 (a linear axis hid
    the baseline), an accuracy CI reaching below 0, and no line at the unigram predictor's level."""
    study = load_study(write_study(tmp_path, seeds=3, metrics={"val/acc": "higher", "val/ppl": "lower"}))
    values = {"ntp": ([0.157, 0.067, 0.105], [100, 270, 137]), "meap": ([0.06, 0.052, 0.062], [2.0e6, 2.6e6, 2.2e6])}
    unigram = {"val/unigram_acc": 0.059, "val/unigram_loss": 5.6, "val/unigram_ppl": 270.4}
    results = [
        RunResult(arm, seed, "ok", {"val/acc": acc[seed], "val/ppl": ppl[seed], **unigram})
        for arm, (acc, ppl) in values.items()
        for seed in range(3)
    ]
    acc_ax, ppl_ax = metric_bars(study, results).axes[:2]
    assert ppl_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    levels = {
        ax: [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] for ax in (acc_ax, ppl_ax)
    }
    assert levels[acc_ax] == pytest.approx([0.059]) and levels[ppl_ax] == pytest.approx([270.4])
    whisker_lines = [c for c in acc_ax.collections if isinstance(c, LineCollection)]
    drawn = [y for line in whisker_lines for segment in line.get_segments() for _, y in segment]
    assert min(drawn) == 0.0  # the baseline's interval [-0.002, 0.222], clipped at 0
    assert "clipped to the metric's range" in acc_ax.get_title()


def test_accuracy_axis_stays_within_a_proportions_range(tmp_path):
    """Accuracies all at 0 (a retrieval suite nothing learnt) are drawn on an axis from 0 up, not one
    centred on 0 that shows negative accuracies."""
    study = load_study(
        write_study(tmp_path, seeds=3, metrics={"eval/retrieval/acc": "higher"}, evaluate={"suites": ["retrieval"]})
    )
    results = [RunResult(arm, seed, "ok", {"eval/retrieval/acc": 0.0}) for arm in ("ntp", "meap") for seed in range(3)]
    bottom, top = metric_bars(study, results).axes[0].get_ylim()
    assert -0.02 <= bottom <= 0 and 0.1 <= top <= 1.02


def write_run_config(folder: Path, arm: str, seed: int, masking: dict | None) -> Path:
    run = folder / "runs" / arm / f"seed_{seed}" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"masking": masking}}}))
    return run


def test_losses_on_different_targets_are_drawn_apart(tmp_path):
    """train/loss of next-token arms (NTP, MEAP: the input differs, the targets do not) share an axis; an MLM
    policy's training loss is on the tokens it chose, so each such arm gets its own panel; a second-to-last
    model validates on its own task, so its val/loss is apart too."""
    meap = {"class_path": "datamodules.MEAPInputMask", "init_args": {}}
    random_mlm = {"class_path": "datamodules.RandomMLMMask"}
    penultimate = {"class_path": "datamodules.PenultimateTokenMask"}
    swap = {"class_path": "datamodules.SecondToLastSwap", "init_args": {"block_length": 4}}

    def panels(arms: dict[str, dict | None]) -> list[tuple[str, list[str]]]:
        folder = tmp_path / "_".join(arms)
        folder.mkdir()
        study = load_study(write_study(folder, arms={a: {"config": NTP} for a in arms}, baseline=next(iter(arms))))
        results = [RunResult(a, 0, "ok", run_dir=write_run_config(folder, a, 0, m)) for a, m in arms.items()]
        return [(tag, group) for tag, group, _ in curve_panels(study, results)]

    assert panels({"ntp": None, "meap": meap}) == [("val/loss", ["ntp", "meap"]), ("train/loss", ["ntp", "meap"])]
    assert panels({"random": random_mlm, "penultimate": penultimate}) == [
        ("val/loss", ["random", "penultimate"]),
        ("train/loss", ["random"]),
        ("train/loss", ["penultimate"]),
    ]
    assert panels({"ntp": None, "stl": swap}) == [
        ("val/loss", ["ntp"]),
        ("val/loss", ["stl"]),
        ("train/loss", ["ntp"]),
        ("train/loss", ["stl"]),
    ]


def fake_plans(study) -> dict[str, ArmPlan]:
    return {name: ArmPlan(128, 4, 512, 1.0, {}) for name in study.arms}


def fake_launch(calls: list, broken: str = "-"):
    """Stands in for a training / evaluation process: a finished run dir, or `error: boom` for `broken`."""

    def launch(command: list[str], log: Path, threads: int) -> int:
        calls.append(command)
        if "experiments.evaluate" in command[2]:
            return 0
        experiment = Path(command[command.index("--runs_dir") + 1]) / command[command.index("--experiment") + 1]
        if experiment.parent.name == broken:
            log.write_text("error: boom\n")
            return 2
        run = experiment / "version_0"
        (run / "hf_model").mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").write_text(json.dumps({"val/loss": 1.0}))
        return 0

    return launch


def test_a_failing_arm_is_reported_and_the_others_finish(tmp_path, monkeypatch):
    arms = {"ntp": {"config": NTP}, "meap": {"config": MEAP}, "sft": {"config": NTP, "init_from": "meap"}}
    study = load_study(write_study(tmp_path, arms=arms))
    calls: list = []
    monkeypatch.setattr(driver, "launch", fake_launch(calls, broken="meap"))
    outcomes = Driver(study, fake_plans(study), tmp_path, parallel=1).run_all()
    status = {(o.arm, o.seed): (o.status, o.error) for o in outcomes}
    assert status["ntp", 0] == status["ntp", 1] == ("ok", None)
    assert status["meap", 1][0] == "failed" and status["meap", 1][1].startswith("training: error: boom (log: ")
    assert status["sft", 0] == ("failed", "the run it starts from (meap seed 0) failed")
    assert len(calls) == 4  # ntp x 2, meap x 2; sft never started


def test_resume_skips_finished_runs_and_continues_interrupted_ones(tmp_path, monkeypatch):
    arms = {"ntp": {"config": NTP, "compare": False}, "sft": {"config": NTP, "init_from": "ntp"}}
    study = load_study(write_study(tmp_path, arms=arms, baseline="sft", evaluate={"suites": ["ppl"]}))
    calls: list = []
    monkeypatch.setattr(driver, "launch", fake_launch(calls))
    Driver(study, fake_plans(study), tmp_path, parallel=2).run_all()
    assert len(calls) == 6  # ntp x 2 trained; sft x 2 trained and evaluated
    # sft seed 1 was interrupted in training: no outcome, a checkpoint, no exported model
    experiment = tmp_path / "runs" / "sft" / "seed_1"
    for name in ("outcome.json", "trained.json"):
        (experiment / name).unlink()
    (experiment / "version_0" / "hf_model").rmdir()
    (experiment / "version_0" / "checkpoints").mkdir()
    (experiment / "version_0" / "checkpoints" / "last.ckpt").write_text("")
    # sft seed 0 trained but was stopped in evaluation
    (tmp_path / "runs" / "sft" / "seed_0" / "outcome.json").unlink()
    calls.clear()
    outcomes = Driver(study, fake_plans(study), tmp_path, parallel=1).run_all()
    assert all(o.status == "ok" for o in outcomes)
    assert [c[2] for c in calls] == ["experiments.evaluate", "experiments.run", "experiments.evaluate"]
    assert calls[0][calls[0].index("--run") + 1] == str(tmp_path / "runs" / "sft" / "seed_0" / "version_0")
    assert calls[1][calls[1].index("--experiment") + 1] == "sft/seed_1" and calls[1][-2:] == ["--ckpt_path", "last"]
    parent = str(tmp_path / "runs" / "ntp" / "seed_1" / "version_0")
    assert calls[1][calls[1].index("--model.init_args.init_from") + 1] == parent


def test_evaluation_draws_with_the_run_seed_and_the_study_args_come_last(tmp_path):
    study = load_study(
        write_study(tmp_path, evaluate={"suites": ["retrieval", "ppl"], "args": ["--retrieval.items", 4]})
    )
    command = Driver(study, fake_plans(study), tmp_path, 1).evaluate_command(study.arms["ntp"], Path("RUN"), 7, {})
    assert command[2:] == [
        "experiments.evaluate",
        "--run",
        "RUN",
        "--suites",
        "retrieval,ppl",
        "--retrieval.seed",
        "7",
        "--ppl.seed",
        "7",
        "--retrieval.items",
        "4",
    ]


def test_an_arms_evaluation_refers_to_the_same_seed_run_of_another_arm(tmp_path, monkeypatch):
    arms = {
        "stl": {"config": NTP, "evaluate_args": ["--second_to_last.ntp", "${ntp}", "--second_to_last.top_k", 3]},
        "ntp": {"config": NTP},
    }
    evaluate = {"suites": ["second_to_last"], "args": ["--second_to_last.top_k", 5]}
    metrics = {"eval/second_to_last/acc": "higher"}
    study = load_study(write_study(tmp_path, arms=arms, evaluate=evaluate, metrics=metrics))
    assert study.arms["stl"].needs == {"ntp": "evaluate_args: ${ntp}"} and study.depth("stl") == 1
    calls: list = []
    monkeypatch.setattr(driver, "launch", fake_launch(calls))
    assert all(o.status == "ok" for o in Driver(study, fake_plans(study), tmp_path, parallel=2).run_all())
    for seed in (0, 1):
        stl = next(
            c for c in calls if c[2] == "experiments.evaluate" and f"stl/seed_{seed}/" in c[c.index("--run") + 1]
        )
        ntp = str(tmp_path / "runs" / "ntp" / f"seed_{seed}" / "version_0")
        assert stl[stl.index("--second_to_last.seed") :] == [
            "--second_to_last.seed",
            str(seed),
            "--second_to_last.top_k",
            "5",
            "--second_to_last.ntp",
            ntp,  # the run of the same seed
            "--second_to_last.top_k",
            "3",  # the arm's evaluate_args come last
        ]
    ntp_eval = next(c for c in calls if c[2] == "experiments.evaluate" and "ntp/seed_0/" in c[c.index("--run") + 1])
    assert "--second_to_last.ntp" not in ntp_eval
    bad = {"stl": {"config": NTP, "evaluate_args": ["--second_to_last.ntp", "${nope}"]}, "ntp": {"config": NTP}}
    with pytest.raises(
        ConfigError, match=r"^.*arms.stl.evaluate_args: \$\{nope\}: 'nope' is not an arm \(arms: stl, ntp\)$"
    ) as error:
        load_study(write_study(tmp_path, arms=bad, evaluate=evaluate, metrics=metrics))
    assert len(error.value.errors) == 1
    shared = {"suites": ["second_to_last"], "args": ["--second_to_last.ntp", "${ntp}"]}
    with pytest.raises(
        ConfigError, match=r"evaluate.args: \$\{ntp\}: an arm's run can be referred to in an arm's evaluate_args only"
    ):
        load_study(write_study(tmp_path, evaluate=shared, metrics=metrics))


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(driver, "launch", lambda *a: pytest.fail("a run was started"))
    assert main(["--config", write_study(tmp_path), "--dry-run", "--studies_dir", str(tmp_path / "studies")]) is None
    out = capsys.readouterr().out
    assert "2 arms x 2 seeds [0, 1] = 4 runs" in out
    assert "| ntp | experiments/configs/ntp.yaml | - | 128 | 4 | 512 |" in out and "(FLOP guide) |" in out
    assert not (tmp_path / "studies").exists()


def test_tiny_study_end_to_end_then_resumed(tmp_path, capsys):
    """2 arms x 2 seeds of real runs, two at a time; then --resume finds every run finished."""
    config = write_study(tmp_path)
    folder = main(["--config", config, "--parallel", "2", "--studies_dir", str(tmp_path / "studies")])
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert sorted((r["arm"], r["seed"], r["status"]) for r in rows) == [
        ("meap", "0", "ok"),
        ("meap", "1", "ok"),
        ("ntp", "0", "ok"),
        ("ntp", "1", "ok"),
    ]
    assert all(float(r["val/loss"]) > 0 and r["tokens_seen"] == "512" for r in rows)
    report = (folder / "report.md").read_text()
    assert re.search(r"\| meap \| 2 \| .* \| 2 \| (better|worse|no difference detected at n=2) \|", report)
    assert {p.name for p in (folder / "plots").iterdir()} == {"learning_curves.png", "metrics.png"}
    assert sorted(p.name for p in (folder / "configs").iterdir()) == ["meap.yaml", "ntp.yaml", "study.yaml"]
    hparams = EventAccumulator(str(folder / "runs" / "meap" / "seed_1" / "version_0" / "hparams"))
    hparams.Reload()
    session = hparams.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"meap" in session and b"MEAPInputMask" in session  # the arm, and the config key that differs
    capsys.readouterr()
    assert main(["--config", config, "--resume", "--studies_dir", str(tmp_path / "studies")]) == folder
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert [p.name for p in (folder / "runs" / "ntp" / "seed_0").glob("version_*")] == ["version_0"]
    # a dry run now shows the time the runs took (median over seeds, the same tokens)
    main(["--config", config, "--dry-run", "--studies_dir", str(tmp_path / "studies")])
    took = [
        json.loads((folder / "runs" / "meap" / f"seed_{s}" / "trained.json").read_text())["train_s"] for s in (0, 1)
    ]
    assert (
        f"| 512 | {driver.minutes((took[0] / 512 + took[1] / 512) / 2 * 512)} (measured) |" in capsys.readouterr().out
    )


SHIPPED_STUDIES = sorted(Path("experiments/configs/studies").glob("*.yaml"))
EVERY_SIZE = [
    pytest.param(path, size, id=f"{path.stem}-{size}")
    for path in SHIPPED_STUDIES
    for size in ["cpu", *(yaml.safe_load(path.read_text()).get("sizes") or {})]
]
RECALL_SIZES = [p for p in EVERY_SIZE if p.values[1] == "recall"]


@pytest.mark.parametrize(("path", "size"), EVERY_SIZE)
def test_every_shipped_study_reads_at_every_size(path, size):
    """The study files' own rules (metrics under a group that the size's evaluation writes, equal
    budgets, a baseline that is an arm) at every size; the arms' run configs are validated by
    `--dry-run` (below for gpu10, the size a GPU visit runs)."""
    study = load_study(str(path), size=size)
    assert study.name == path.stem and study.size == size
    assert study.baseline in study.compared and len(study.compared) >= 2
    assert len(study.seeds) >= 3


@pytest.mark.parametrize("size", ["cpu", "gpu10", "gpu"])
def test_entropy_masking_trains_its_teacher_and_every_student_takes_its_tokenizer(size):
    """The teacher arm trains its own BPE; every other arm's last tokenizer_path is the teacher's
    same-seed run, so a seed's teacher and students share one vocabulary (and KD / teacher entropy
    can use it); the teacher trains 4x a student's budget at the GPU size, 2x at the CPU and gpu10 sizes (time)."""
    study = load_study("experiments/configs/studies/entropy_masking.yaml", size=size)
    teacher = study.arms["mlm_teacher"]
    assert not teacher.compare and not teacher.needs and "--data.init_args.tokenizer_path" not in study.args
    assert teacher.budget_tokens == {"cpu": 2, "gpu10": 2, "gpu": 4}[size] * study.budget_tokens
    for arm in study.compared:
        args = [*study.args, *study.arms[arm].args]
        last = len(args) - 1 - args[::-1].index("--data.init_args.tokenizer_path")
        assert args[last + 1] == "${mlm_teacher}/hf_model", arm
    assert (
        "${mlm_teacher}/hf_model" in study.arms["kd"].args
        and "${mlm_teacher}/hf_model" in study.arms["teacher"].args[-1]
    )


@pytest.mark.parametrize(("path", "size"), RECALL_SIZES)
def test_every_recall_size_validates_its_arms(path, size, capsys):
    """The CPU sizes on the recall corpus (issue 20): every arm's run config, budget and metric names."""
    main(["--config", str(path), "--size", size, "--dry-run"])
    assert "every config is valid" in capsys.readouterr().out


@pytest.mark.parametrize("path", SHIPPED_STUDIES, ids=lambda p: p.stem)
def test_every_gpu10_size_validates_and_fits_ten_minutes_of_its_device(path, capsys):
    """What one GPU visit runs (issue 23): every arm x seed at `--parallel 6`, estimated from the
    launch-bound step time and run overhead measured on an H200, within 10 minutes."""
    main(["--config", str(path), "--size", "gpu10", "--dry-run", "--parallel", "6"])
    out = capsys.readouterr().out
    estimate = re.search(r"estimated device time on one NVIDIA H200: ~(\d+) (s|min) in all, 6 runs at a time", out)
    assert estimate and "every config is valid" in out
    assert int(estimate[1]) * (60 if estimate[2] == "min" else 1) <= 600


def test_gpu_estimate_is_the_launch_floor_for_small_models_and_the_flops_for_large_ones():
    def config(width: int, layers: int) -> dict:
        return {
            "model": {"init_args": {"hidden_size": width, "num_layers": layers}},
            "data": {"init_args": {"vocab_size": 128, "block_size": 129, "batch_size": 64}},
        }

    small = config(128, 2)  # 4,000 steps of 64 x 129 tokens: 4,000 x 2 layers x 16 ms, then the run's fixed cost
    assert driver.gpu_seconds(small, 4000 * 64 * 129, "NVIDIA H200") == pytest.approx(4000 * 2 * 0.016 + 50)
    large = config(4096, 32)  # compute-bound: 6·N·tokens at 30% of the H200's 989.5 TFLOP/s
    tokens = 1000 * 64 * 129
    flops = (6 * (12 * 32 * 4096**2 + 128 * 4096) + 12 * 32 * 4096 * 129) * tokens
    assert driver.gpu_seconds(large, tokens, "NVIDIA H200") == pytest.approx(flops / (989.5e12 * 0.3) + 50)


def test_the_flop_guide_counts_the_recall_corpus_own_vocabulary_not_data_vocab_size():
    data = {"vocab_size": 4096, "block_size": 65, "builtin_variant": "recall", "recall": {"keys": 32}}
    config = {"model": {"init_args": {"hidden_size": 64, "num_layers": 2}}, "data": {"init_args": data}}
    vocab = 7 + 32 + 64 + 64  # the special tokens, keys, values, filler types
    assert driver.flops_per_token(config) == 6 * (12 * 2 * 64**2 + vocab * 64) + 12 * 2 * 64 * 65
