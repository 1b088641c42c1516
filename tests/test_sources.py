"""Raw text -> documents -> tokens: paragraph splitting, strict UTF-8, special-token strings as text,
and the one-line errors a bad corpus file gets from the real entry point."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from core.errors import DataError
from datamodules.finetune import encode
from datamodules.packing import tokenize
from datamodules.sources import load_text_files, paragraphs, read_text
from datamodules.tokenizer import train_bpe, vocab_of

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def test_lines_of_only_whitespace_separate_paragraphs():
    text = " = Title = \n \n First line\nsecond line . \n\t\r\n\n Last .\n  \n"
    assert paragraphs(text) == ["= Title =", "First line\nsecond line .", "Last ."]


def test_text_without_blank_lines_is_one_paragraph_and_blank_text_none():
    assert paragraphs("one\ntwo\n") == ["one\ntwo"]
    assert paragraphs(" \n\n \t\n") == []


def test_files_load_in_order_one_example_per_paragraph(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    first.write_text("A one.\n \nA two.\n")
    second.write_bytes(gzip.compress(b"B one.\r\n\r\nB two."))
    assert load_text_files([first, second], "data.data_path")["text"] == ["A one.", "A two.", "B one.", "B two."]


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ok\n\n".encode() + "na\u00efve".encode("latin-1"))
    # "café ok\n\n" is 10 bytes in UTF-8; "na" 2 more: the Latin-1 ï (0xef) sits at offset 12
    with pytest.raises(DataError) as raised:
        read_text(bad, "data.data_path")
    assert str(raised.value) == (
        f"data.data_path: {bad} is not UTF-8 text: byte 0xef at byte offset 12 (invalid continuation byte)"
    )


def test_empty_file_is_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(DataError, match=f"^data.val_data_path: {empty} holds no text \\(empty corpus\\)$"):
        load_text_files([empty], "data.val_data_path")


def test_special_token_strings_in_text_are_ordinary_characters():
    tokenizer = train_bpe(["a <unk> word and <s> there"] * 20 + ["plain words here"] * 20, vocab_size=300)
    dataset = Dataset.from_dict({"text": ["a <unk> word and <s> there"]})
    pieces = tokenizer.convert_ids_to_tokens(tokenize(dataset, tokenizer)["input_ids"][0])
    assert not set(pieces) & set(tokenizer.all_special_tokens)
    assert "".join(pieces).replace("Ġ", " ") == "a <unk> word and <s> there"
    assert "Ġ" not in pieces  # no bare space left in front of a split-off special token


@pytest.mark.skipif(not WIKITEXT_VALID.exists(), reason=f"{WIKITEXT_VALID} is absent")
def test_wikitext_loads_as_paragraphs_and_unk_stays_text():
    dataset = load_text_files([WIKITEXT_VALID], "data.data_path")
    # 3,760 lines, every other one blank (" "): 1,160 headings and paragraphs
    assert len(dataset) == 1160
    assert dataset["text"][0] == "= Homarus gammarus ="
    assert sum(text.count("<unk>") for text in dataset["text"]) == 11718
    tokenizer = train_bpe(dataset["text"], vocab_size=1024)
    tokenized = tokenize(dataset, tokenizer)["input_ids"]
    ids = np.concatenate(tokenized)
    assert (ids == tokenizer.unk_token_id).sum() == 0  # every "<unk>" string is text, not the special token
    # 0.29% measured (BPE's own bare-space pieces at this small vocabulary); 5.1% when "<unk>" became special
    assert (ids == tokenizer.convert_tokens_to_ids("Ġ")).mean() < 0.005
    assert tokenizer.decode(tokenized[1]) == dataset["text"][1] and "<unk>" in dataset["text"][1]


def test_bad_corpus_files_stop_the_real_entry_point_with_one_line(tmp_path):
    """Both faults at once (two processes side by side): exit 2, one line naming the file, no run written."""
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("")
    latin1.write_bytes(b"Fine text.\n\nna\xefve\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {f: tmp_path / f"runs_{f.stem}" for f in (empty, latin1)}
    processes = {
        f: subprocess.Popen(
            [
                *(sys.executable, "-m", "experiments.run", "--config", "experiments/configs/quickstart.yaml"),
                *("--data.init_args.data_path", str(f), "--runs_dir", str(runs[f])),
                *("--data.cache_dir", str(tmp_path / "cache")),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in runs
    }
    expected = {
        empty: f"error: data.data_path: {empty} holds no text (empty corpus)",
        latin1: f"error: data.data_path: {latin1} is not UTF-8 text: byte 0xef at byte offset 14"
        " (invalid continuation byte)",
    }
    for file, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr
        assert stderr.strip().splitlines()[-1] == expected[file] and "Traceback" not in stderr
        assert [p for p in runs[file].rglob("*") if p.is_file() or p.name.startswith("version_")] == []


def test_fine_tuning_text_keeps_special_token_strings_as_text():
    tokenizer = train_bpe(["Q: say <s> now", "A: the <mask> word"] * 20, vocab_size=300)
    prepared = encode(
        [("say <s> now", "the <mask> word")], tokenizer, vocab_of(tokenizer), "{prompt}", " {answer}", 64, "drop"
    )
    ids = prepared.ids[0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert not set(ids[1:-1]) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids[1:-1]) == "say <s> now the <mask> word"
