"""Retrieval by gold position: the gold item goes where asked; oracles score 1; the LITM reader."""

import gzip
import json
import re

import pytest

from core.errors import ConfigError, DataError
from evaluation import retrieval
from evaluation.model import load_model


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    return load_model(str(tiny_causal_dir))


def oracle(loaded):
    """Finds the asked key's value in the prompt, as a perfect reader would."""

    def answer(prompts, _new_tokens):
        out = []
        for ids in prompts:
            text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
            if "JSON data" in text:
                key = re.search(r'value of "(\w+)"\?', text)[1]
                out.append(re.search(rf'"{key}": "(\d+)"', text)[1])
            else:
                attribute, name = re.search(r"what is the (\w+) of (\w+)\?", text).groups()
                out.append(re.search(rf"The {attribute} of {name} is (\d+)\.", text)[1])
        return out

    return answer


def test_the_gold_item_moves_to_each_position():
    example = retrieval.Example(["gold", "a", "b", "c"], 0, "q", ["x"], "qa")
    assert [example.with_gold_at(p) for p in (0, 2, 3)] == [
        ["gold", "a", "b", "c"],
        ["a", "b", "gold", "c"],
        ["a", "b", "c", "gold"],
    ]
    assert example.truncated(2).items == ["gold", "a"]
    assert retrieval.gold_positions(10, 4) == [0, 3, 6, 9] and retrieval.gold_positions(3, None) == [0, 1, 2]


def test_an_oracle_scores_1_at_every_position_and_a_constant_model_0(causal):
    options = retrieval.Options(examples=3, positions=3)
    perfect = retrieval.run(causal, options, answerer=oracle(causal))
    assert perfect.metrics["acc"] == 1.0 and all(v == 1.0 for k, v in perfect.metrics.items() if "position" in k)
    assert {"kv/acc_position_1", "qa/acc_position_1"} <= set(perfect.metrics)
    constant = retrieval.run(causal, options, answerer=lambda prompts, n: ["1000"] * len(prompts))
    assert constant.metrics["acc"] == 0.0
    assert set(perfect.figures) == {"by_position"}


def test_items_default_to_what_fits_the_context(causal):
    result = retrieval.run(causal, retrieval.Options(examples=2, positions=2), answerer=oracle(causal))
    for task in ("kv", "qa"):
        assert 2 <= result.details[task]["items"] <= 10
    with pytest.raises(ConfigError, match="lower retrieval.items"):
        retrieval.run(causal, retrieval.Options(tasks=["qa"], items=10, examples=2))


def test_a_real_model_answers_greedily(causal, tiny_mlm_dir):
    result = retrieval.run(causal, retrieval.Options(tasks=["kv"], items=3, examples=2, positions=2))
    assert 0.0 <= result.metrics["acc"] <= 1.0
    encoder = retrieval.run(
        load_model(str(tiny_mlm_dir)), retrieval.Options(tasks=["kv"], items=3, examples=2, positions=2)
    )
    assert 0.0 <= encoder.metrics["kv/acc"] <= 1.0


def test_lost_in_the_middle_files_are_read_with_the_gold_moved(tmp_path, causal):
    qa = {
        "question": "who wrote it?",
        "answers": ["Ann Lee"],
        "ctxs": [
            {"title": "A", "text": "Bob wrote a song.", "hasanswer": False, "isgold": False},
            {"title": "B", "text": "Ann Lee wrote it.", "hasanswer": True, "isgold": True},
            {"title": "C", "text": "Cy read it.", "hasanswer": False, "isgold": False},
        ],
    }
    path = tmp_path / "qa.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(qa) + "\n")
    example = retrieval.read_lost_in_the_middle(str(path))[0]
    assert example.items[example.gold].endswith("Ann Lee wrote it.") and example.kind == "qa"
    assert example.with_gold_at(2)[2].endswith("Ann Lee wrote it.")
    kv = {"ordered_kv_records": [["k1", "v1"], ["k2", "v2"]], "key": "k2", "value": "v2"}
    (tmp_path / "kv.jsonl").write_text(json.dumps(kv) + "\n")
    example = retrieval.read_lost_in_the_middle(str(tmp_path / "kv.jsonl"))[0]
    assert example.items[example.gold] == '"k2": "v2"' and example.answers == ["v2"]
    result = retrieval.run(
        causal, retrieval.Options(data=str(path), positions=None), answerer=lambda p, n: ["Ann Lee"] * len(p)
    )
    assert result.metrics["litm_qa/acc"] == 1.0 and result.details["litm_qa"]["positions"] == [1, 2, 3]


def test_bad_files_are_named(tmp_path, causal):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*missing answers, ctxs"):
        retrieval.read_lost_in_the_middle(str(tmp_path / "bad.jsonl"))
    (tmp_path / "kv.jsonl").write_text(
        json.dumps({"ordered_kv_records": [["a", "b"]], "key": "z", "value": "b"}) + "\n"
    )
    with pytest.raises(DataError, match="key 'z' is not among"):
        retrieval.read_lost_in_the_middle(str(tmp_path / "kv.jsonl"))
    with pytest.raises(ConfigError, match="unknown nope"):
        retrieval.run(causal, retrieval.Options(tasks=["nope"]))


def qa_record(question: str, answer: str, documents: list[str], gold: int) -> dict:
    ctxs = [{"title": f"T{i}", "text": text, "isgold": i == gold} for i, text in enumerate(documents)]
    return {"question": question, "answers": [answer], "ctxs": ctxs}


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_oracle_file_with_one_document_per_example_runs(tmp_path, causal):
    """lost-in-the-middle's oracle files hold only the gold document: one item, one position."""
    oracle_file = write_jsonl(
        tmp_path / "nq-open-oracle.jsonl",
        [
            qa_record("who wrote it?", "Ann Lee", ["Ann Lee wrote it."], 0),
            qa_record("who sang?", "Bo", ["Bo sang."], 0),
        ],
    )
    result = retrieval.run(causal, retrieval.Options(data=str(oracle_file)), answerer=lambda p, n: ["Ann Lee", "x"])
    details = result.details["litm_qa"]
    assert details["items"] == 1 and details["positions"] == [1] and details["skipped_too_long"] == 0
    assert result.metrics == {"acc": 0.5, "litm_qa/acc": 0.5, "litm_qa/acc_position_1": 0.5}
    assert details["answers"] == [
        {"position": 1, "question": "who wrote it", "gold": ["Ann Lee"], "answer": "Ann Lee", "correct": True},
        {"position": 1, "question": "who sang", "gold": ["Bo"], "answer": "x", "correct": False},
    ]


def test_examples_too_long_for_the_context_are_skipped_and_counted(tmp_path, causal):
    short = [qa_record(f"q{i}?", "Ann", ["Ann wrote it.", "Bob read."], 0) for i in range(3)]
    long = qa_record("q?", "Ann", ["Ann wrote it.", "word " * 400], 0)  # 400+ tokens: past the 256 context
    path = write_jsonl(tmp_path / "mixed.jsonl", [*short, long])
    result = retrieval.run(
        causal, retrieval.Options(data=str(path), positions=None), answerer=lambda p, n: ["Ann"] * len(p)
    )
    details = result.details["litm_qa"]
    assert (details["items"], details["examples_per_position"], details["skipped_too_long"]) == (2, 3, 1)
    assert len(details["answers"]) == 2 * 3 and result.metrics["acc"] == 1.0
    with pytest.raises(ConfigError, match=r"^retrieval.items=2: no litm_qa prompt of 2 items fits .* 256 tokens"):
        retrieval.run(causal, retrieval.Options(data=str(write_jsonl(tmp_path / "long.jsonl", [long])), items=2))
    with pytest.raises(DataError, match="no litm_qa example fits the model's context of 256 tokens, even with 1"):
        too_long = qa_record("q?", "Ann", ["word " * 400], 0)
        retrieval.run(causal, retrieval.Options(data=str(write_jsonl(tmp_path / "one.jsonl", [too_long]))))


def test_a_file_whose_examples_mostly_do_not_fit_runs_the_ones_that_do(tmp_path, causal):
    """Issue 21.12: lost-in-the-middle's nq-open-oracle file has 416 of 2,655 examples that fit a 256-token
    context; without `items` the suite refused it ("no example fits ..."). It now runs the most items at
    which any example fits, skips and counts the rest, and says so."""
    fits = qa_record("q?", "Ann", ["Ann wrote it."], 0)
    too_long = [qa_record(f"q{i}?", "Ann", ["word " * 400], 0) for i in range(3)]  # 3 of 4: fewer than half fit
    path = write_jsonl(tmp_path / "nq-open-oracle.jsonl", [too_long[0], fits, *too_long[1:]])
    result = retrieval.run(causal, retrieval.Options(data=str(path)), answerer=lambda p, n: ["Ann"] * len(p))
    details = result.details["litm_qa"]
    assert (details["items"], details["examples_per_position"], details["skipped_too_long"]) == (1, 1, 3)
    assert details["items_chosen"] == "1 items: the most at which any example fits (1 of 4)"
    assert "litm_qa: 1 items: the most at which any example fits (1 of 4); 3 of 4 examples skipped" in result.table
    assert result.metrics["acc"] == 1.0
    half = write_jsonl(tmp_path / "half.jsonl", [fits, too_long[0]])  # half fit: the first rule
    chosen = retrieval.run(causal, retrieval.Options(data=str(half)), answerer=lambda p, n: ["Ann"] * len(p))
    assert chosen.details["litm_qa"]["items_chosen"] == "1 items: the most at which at least half of the examples fit"


def test_several_files_are_tasks_named_by_file(tmp_path, causal):
    first = write_jsonl(tmp_path / "gold_at_0.jsonl", [qa_record("q?", "Ann", ["Ann wrote it.", "Bob read."], 0)])
    second = tmp_path / "gold_at_1.jsonl.gz"
    with gzip.open(second, "wt") as f:
        f.write(json.dumps(qa_record("q?", "Cy", ["Bob read.", "Cy wrote it."], 1)) + "\n")
    result = retrieval.run(causal, retrieval.Options(data=f"{first},{second}"), answerer=lambda p, n: ["Ann"] * len(p))
    assert set(result.details) == {"gold_at_0", "gold_at_1"}
    assert (result.metrics["gold_at_0/acc"], result.metrics["gold_at_1/acc"], result.metrics["acc"]) == (1.0, 0.0, 0.5)
