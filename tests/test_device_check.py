"""`python -m benchmarks.device_check`: its tiny shape end to end on a CPU, and its budget."""

from __future__ import annotations

import sys

import pytest

from benchmarks import device_check
from benchmarks.device_check import Stage
from tests.test_study import write_study


def test_tiny_visit_runs_every_stage_and_writes_one_summary(tmp_path):
    study = write_study(tmp_path, seeds=1)
    visit = device_check.main(
        [
            "--shape",
            "tiny",
            "--out",
            str(tmp_path / "out"),
            "--budget",
            "400",
            "--tests-filter",
            "quickstart and bf16",
            "--test-workers",
            "1",
            "--config-steps",
            "3",
            "--study",
            study,
            "--size",
            "cpu",
            "--study-parallel",
            "1",
        ]
    )
    assert [(s.name, s.status) for s in visit.stages] == [
        ("env", "ok"),
        ("tests", "ok"),
        ("study", "ok"),
        ("suite", "ok"),
    ]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "device: CPU" in summary and "| tests | ok |" in summary
    assert "tests: 1 of 1 passed" in summary  # the quickstart config trained 3 steps in bf16 with fused AdamW
    assert "| test_every_shipped_config_trains_in_bf16_with_fused_adamw_and_its_clipping[quickstart] | passed |" in (
        summary
    )
    assert "| 134m NTP, B=16, eager | " in summary  # the suite's table, also in suite.md
    assert (tmp_path / "out" / "suite.md").read_text().startswith("CPU; torch ")
    assert list((tmp_path / "out" / "studies" / "tiny").glob("*/report.md"))


def fake_stages(seconds: float):
    """A visit whose tests take `seconds` and whose suite prints one line."""

    def stages(args, visit):
        slow = Stage("tests", [sys.executable, "-c", f"import time; time.sleep({seconds})"])
        return [], [slow], [Stage("suite", [sys.executable, "-c", "print('suite ran')"])]

    return stages


@pytest.mark.parametrize(
    "share, suite_status",
    [(0.5, "ok"), (1.0, "not started")],
    ids=["cut, then the suite runs", "cut, and nothing left for the suite"],
)
def test_a_stage_past_its_deadline_is_cut_and_the_report_says_what_ran(tmp_path, share, suite_status):
    visit = device_check.main(
        ["--out", str(tmp_path), "--budget", "4", "--share", str(share)], stages=fake_stages(seconds=60)
    )
    tests, suite = visit.stages
    assert tests.status == f"cut at {4 * share:.0f} s of the budget" and tests.seconds < 20
    assert suite.status == suite_status
    summary = (tmp_path / "summary.md").read_text()
    assert f"| tests | cut at {4 * share:.0f} s of the budget |" in summary
    assert f"| suite | {suite_status} |" in summary
    if suite_status == "not started":
        assert "| suite | not started |  | budget spent |" in summary
    else:
        assert "suite ran" in (tmp_path / "suite.log").read_text()
