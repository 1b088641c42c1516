"""BLiMP: the reader, accuracy by field and paradigm, and both scoring methods."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, DataError
from evaluation import blimp
from evaluation.model import load_model

REAL = Path(__file__).parents[1] / "../shared/data/blimp"


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(good: str, bad: str, uid: str, field: str = "syntax") -> dict:
    return {"sentence_good": good, "sentence_bad": bad, "field": field, "UID": uid, "pairID": "0"}


@pytest.fixture
def small_blimp(tmp_path) -> Path:
    folder = tmp_path / "blimp"
    folder.mkdir()
    write_pairs(
        folder / "a.jsonl",
        [
            pair("The cat sits.", "The cat sit.", "agreement", "morphology"),
            pair("Dogs run.", "Dogs runs.", "agreement", "morphology"),
        ],
    )
    write_pairs(
        folder / "b.jsonl",
        [pair("Who left?", "Who left him?", "island"), pair("What fell?", "What fell it?", "island")],
    )
    return folder


def test_accuracy_overall_by_field_and_by_paradigm(small_blimp, tiny_causal_dir, monkeypatch):
    loaded = load_model(str(tiny_causal_dir))
    # a hand-made scorer: prefers the good sentence of every pair but "What fell?"
    preferred = {"The cat sits.", "Dogs run.", "Who left?", "What fell it?"}
    monkeypatch.setattr(
        blimp, "sentence_scores", lambda _, sentences, __: torch.tensor([float(s in preferred) for s in sentences])
    )
    result = blimp.run(loaded, blimp.Options(data=str(small_blimp)))
    assert result.metrics["acc"] == 0.75
    assert result.metrics["paradigm/agreement"] == 1.0 and result.metrics["paradigm/island"] == 0.5
    assert result.metrics["field/morphology"] == 1.0 and result.metrics["field/syntax"] == 0.5


def test_a_model_that_always_prefers_the_good_sentence_scores_100(small_blimp, tiny_causal_dir, monkeypatch):
    loaded = load_model(str(tiny_causal_dir))
    good = {p["sentence_good"] for f in small_blimp.iterdir() for p in map(json.loads, f.read_text().splitlines())}
    monkeypatch.setattr(
        blimp, "sentence_scores", lambda _, sentences, __: torch.tensor([float(s in good) for s in sentences])
    )
    assert blimp.run(loaded, blimp.Options(data=str(small_blimp))).metrics["acc"] == 1.0
    monkeypatch.setattr(blimp, "sentence_scores", lambda _, sentences, __: torch.zeros(len(sentences)))
    assert blimp.run(loaded, blimp.Options(data=str(small_blimp))).metrics["acc"] == 0.0  # a tie is no preference


@pytest.mark.parametrize("fixture", ["tiny_causal_dir", "tiny_mlm_dir"])
def test_real_models_score_each_pair(fixture, small_blimp, request):
    loaded = load_model(str(request.getfixturevalue(fixture)))
    result = blimp.run(loaded, blimp.Options(data=str(small_blimp), max_pairs=1))
    assert result.details["pairs"] == 2 and 0.0 <= result.metrics["acc"] <= 1.0
    assert result.details["method"] == ("log-probability" if fixture == "tiny_causal_dir" else "pseudo-log-likelihood")
    assert set(result.figures) == {"paradigms"}


def test_bad_input_names_the_file_and_line(tmp_path, tiny_causal_dir):
    loaded = load_model(str(tiny_causal_dir))
    broken = write_pairs(tmp_path / "broken.jsonl", [pair("A.", "B.", "x"), {"sentence_good": "A.", "UID": "x"}])
    with pytest.raises(DataError, match=r"broken.jsonl:2: missing field\(s\) sentence_bad, field"):
        blimp.run(loaded, blimp.Options(data=str(broken)))
    with pytest.raises(ConfigError, match="exactly one of"):
        blimp.run(loaded, blimp.Options())
    with pytest.raises(ConfigError, match="nope not in the data"):
        blimp.run(
            loaded,
            blimp.Options(data=str(write_pairs(tmp_path / "ok.jsonl", [pair("A.", "B.", "x")])), paradigms=["nope"]),
        )


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/blimp is absent")
def test_reader_on_the_real_blimp_files():
    pairs = blimp.read_jsonl(REAL / "adjunct_island.jsonl.gz")
    assert len(pairs) == 1000 and pairs[0].paradigm == "adjunct_island" and pairs[0].field == "syntax"
    assert pairs[0].good == "Who should Derek hug after shocking Richard?"
    # one file spells the field "syntax/semantics": both spellings become one field
    assert {p.field for p in blimp.read_jsonl(REAL / "principle_A_case_2.jsonl.gz")} == {"syntax_semantics"}
    limited = blimp.load_pairs(blimp.Options(data=str(REAL), max_pairs=2))
    files = len(list(REAL.glob("*.jsonl.gz")))
    assert len(limited) == 2 * files and len({p.paradigm for p in limited}) == files
    with gzip.open(REAL / "adjunct_island.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["sentence_bad"] == pairs[0].bad


def test_a_datasets_source_reads_like_the_files(tmp_path, tiny_causal_dir):
    from datasets import Dataset

    rows = [
        pair("The cat sits.", "The cat sit.", "agreement", "morphology"),
        pair("Who left?", "Who left him?", "island"),
    ]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    from_files = blimp.load_pairs(blimp.Options(data=str(write_pairs(tmp_path / "p.jsonl", rows))))
    assert blimp.load_pairs(blimp.Options(hf_dataset=str(tmp_path / "saved"))) == from_files
