"""Result groups: which data a suite scored decides its metrics.json keys; a re-run replaces its group."""

from __future__ import annotations

import json

import pytest

from evaluation import blimp, glue, needle, retrieval
from evaluation.result import SuiteResult
from evaluation.suites import data_tag, save_results
from experiments.evaluate import build_parser


@pytest.mark.parametrize(
    ("suite", "options", "tag"),
    [
        ("retrieval", retrieval.Options(), None),
        ("retrieval", retrieval.Options(items=3, examples=5), None),  # how it is scored, not which data
        ("retrieval", retrieval.Options(data="/d/qa_data/nq-open-oracle.jsonl.gz"), "nq-open-oracle"),
        ("retrieval", retrieval.Options(data=["/d/b_gold_at_9.jsonl", "/d/a gold.jsonl"]), "a_gold+b_gold_at_9"),
        ("blimp", blimp.Options(data="/d/blimp", max_pairs=100), None),
        ("blimp", blimp.Options(data="/d/blimp", paradigms="wh_island"), "wh_island"),
        ("glue", glue.Options(tasks=["rte", "cola", "sst2", "mrpc"]), None),  # the default four, in another order
        ("glue", glue.Options(tasks=["rte"]), "rte"),
        ("needle", needle.Options(haystack="../shared/data/pg_essays"), "pg_essays"),
    ],
)
def test_data_tag_names_data_other_than_the_default(suite, options, tag):
    assert data_tag(suite, options) == tag


def test_many_names_shorten_to_the_first_a_count_and_a_hash():
    tag = data_tag("blimp", blimp.Options(data="/d", paradigms=["b", "a", "c", "d"]))
    assert tag.startswith("a+3more-") and len(tag) == len("a+3more-") + 6
    assert tag == data_tag("blimp", blimp.Options(data="/d", paradigms="d,c,b,a"))
    assert tag != data_tag("blimp", blimp.Options(data="/d", paradigms="e,c,b,a"))


def result(**metrics: float) -> SuiteResult:
    return SuiteResult(metrics, table="|")


def test_a_rerun_replaces_its_group_and_other_data_gets_its_own_keys(tmp_path):
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps({"val/loss": 3.0, "eval/needle/acc": 0.25}))
    save_results({"blimp": result(acc=0.568, **{"paradigm/a": 0.5, "paradigm/b": 0.636})}, tmp_path, metrics_file)
    save_results({"blimp@a": result(acc=0.5, **{"paradigm/a": 0.5})}, tmp_path, metrics_file)
    save_results({"blimp": result(acc=0.6, **{"paradigm/b": 0.6})}, tmp_path, metrics_file)  # re-run: b only left
    assert json.loads(metrics_file.read_text()) == {
        "val/loss": 3.0,
        "eval/needle/acc": 0.25,
        "eval/blimp/acc": 0.6,
        "eval/blimp/paradigm/b": 0.6,
        "eval/blimp@a/acc": 0.5,
        "eval/blimp@a/paradigm/a": 0.5,
    }
    assert sorted(p.name for p in tmp_path.glob("blimp*.json")) == ["blimp.json", "blimp@a.json"]
    report = (tmp_path / "report.md").read_text()
    assert report.index("| blimp | acc | 0.6 |") < report.index("| blimp@a | acc | 0.5 |")


def test_list_options_take_one_name_on_the_command_line():
    config = build_parser().parse_args(
        ["--run", "r", "--suites", "blimp", "--blimp.paradigms", "wh_island", "--retrieval.data", "a.jsonl,b.jsonl"]
    )
    assert blimp.select(
        [blimp.MinimalPair("A.", "B.", "syntax", "wh_island"), blimp.MinimalPair("C.", "D.", "syntax", "other")],
        config.blimp,
    ) == [blimp.MinimalPair("A.", "B.", "syntax", "wh_island")]
    assert retrieval.as_names(config.retrieval.data) == ["a.jsonl", "b.jsonl"]
