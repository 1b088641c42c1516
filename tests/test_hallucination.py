"""hallucination: the offline scores on hand-made pairs, the lookback ratio on a hand-built
attention tensor, the prompts, the suite end to end on a tiny decoder, and one-line errors."""

import copy
import gzip
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from core.errors import ConfigError, DataError
from evaluation import faithfulness, hallucination
from evaluation.model import load_model
from evaluation.suites import group_name, metric_names
from experiments.evaluate import main as evaluate

XSUM = Path(__file__).parents[1] / "../shared/data/xsum/xsum-1000.jsonl.gz"
ARTICLE = "Prison Link Cymru had 1,099 referrals in 2015, up 12.5%.\nThe Welsh Government paid 3.50 pounds."


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    return load_model(str(tiny_causal_dir))


def write_articles(path: Path, count: int, gz: bool = False, **fields) -> Path:
    records = [
        {"document": f"{ARTICLE} Story {i}.", "summary": "The Welsh Government paid.", "id": f"a{i}"} | fields
        for i in range(count)
    ]
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_numbers_are_normalised_and_unsupported_ones_found():
    assert faithfulness.numbers(ARTICLE) == {"1099", "2015", "12.5", "3.5"}
    summary = "Referrals rose to 1099 (12.50%) in 2016, 13% more, at 3.5 pounds."
    assert faithfulness.unsupported_numbers(summary, ARTICLE) == {"2016", "13"}
    assert faithfulness.unsupported_numbers("It had 1,099 referrals.", ARTICLE) == set()


def test_names_skip_sentence_starts_and_unsupported_ones_are_found():
    summary = "Officials at Prison Link Cymru met Welsh ministers. John Smith said I agree, said Carwyn Jones."
    assert faithfulness.names(summary) == {"Prison Link Cymru", "Welsh", "Smith", "Carwyn Jones"}
    assert faithfulness.unsupported_names(summary, ARTICLE) == {"Smith", "Carwyn Jones"}
    assert faithfulness.unsupported_names("Referrals rose. Prison numbers fell.", ARTICLE) == set()
    assert faithfulness.unsupported_names("It went to Link.", "The Linkage is new.") == {"Link"}  # whole words only


def test_novel_ngram_shares_and_rouge():
    article, summary = "the cat sat on the mat", "The cat sat on a mat."
    assert faithfulness.novel_ngram_share(summary, article, 1) == pytest.approx(1 / 6)
    assert faithfulness.novel_ngram_share(summary, article, 2) == pytest.approx(2 / 5)
    assert faithfulness.novel_ngram_share(summary, article, 3) == pytest.approx(2 / 4)
    assert faithfulness.novel_ngram_share("cat", article, 2) is None
    scores = faithfulness.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == [pytest.approx(2 / 3)]  # precision 1, recall 1/2
    assert scores["rouge2"] == [pytest.approx(2 * 0.4 / 1.4)]  # precision 1, recall 2/5
    assert scores["rougeL"] == [pytest.approx(2 / 3)]  # LCS 3


def test_lookback_ratio_on_a_hand_built_attention_tensor():
    """Prompt: position 0 (instruction), article at 1-2; generated tokens at 3 and 4; 1 layer, 2 heads."""
    attention = torch.zeros(1, 2, 5, 5)
    attention[0, 0, 3, :4] = torch.tensor([0.1, 0.3, 0.3, 0.3])  # article mean 0.3, generated mean 0.3: 1/2
    attention[0, 1, 3, :4] = torch.tensor([0.0, 0.4, 0.4, 0.2])  # 0.4 / (0.4 + 0.2) = 2/3
    attention[0, 0, 4] = 0.2  # article 0.2, generated (0.2 + 0.2) / 2: 1/2
    attention[0, 1, 4] = torch.tensor([0.0, 0.1, 0.1, 0.4, 0.4])  # 0.1 / (0.1 + 0.4) = 1/5
    ratios = faithfulness.lookback_ratios(attention, slice(1, 3), 3)
    assert ratios.tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, (1 / 2 + 1 / 5) / 2])


def test_prompts_use_the_chat_template_when_there_is_one_and_cut_articles_at_their_end(causal, tmp_path):
    options = hallucination.Options(data=str(write_articles(tmp_path / "a.jsonl", 3)), articles=2, max_new_tokens=200)
    before, after = hallucination.prompt_parts(causal, options)
    assert (
        before[0] == causal.vocab.bos_id and causal.tokenizer.decode(before[1:]) == "Summarize the following article: "
    )
    assert after == []
    chat = copy.copy(causal)
    chat.tokenizer = copy.deepcopy(causal.tokenizer)
    chat.tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    before, after = hallucination.prompt_parts(chat, options)
    assert (
        chat.tokenizer.decode(before) == "<u>Summarize the following article: "
        and chat.tokenizer.decode(after) == "</u><a>"
    )
    plain = hallucination.prompt_parts(chat, hallucination.Options(chat_template=False))
    assert plain == hallucination.prompt_parts(causal, options)
    articles = hallucination.read_articles(options)
    prompts, spans, seen = hallucination.build_prompts(causal, options, articles)
    assert all(len(p) == 256 - 200 for p in prompts)  # cut to leave max_new_tokens in the context of 256
    assert all(
        s.stop == len(p) and a.document.startswith(text) for p, s, a, text in zip(prompts, spans, articles, seen)
    )
    assert all(len(text) < len(a.document) for a, text in zip(articles, seen))


class ScriptedDecoder(torch.nn.Module):
    """`generate` appends fixed tokens to every prompt and records what it was given."""

    def __init__(self, tokens: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device for LoadedModel.device
        self.tokens, self.calls = tokens, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids, attention_mask, kwargs))
        return torch.cat([input_ids, torch.tensor([self.tokens] * len(input_ids))], 1)


def test_summaries_are_greedy_left_padded_and_stop_at_the_paragraph_end_or_eos(causal):
    encode = lambda text: causal.tokenizer(text, add_special_tokens=False)["input_ids"]
    scripted = copy.copy(causal)
    scripted.model = ScriptedDecoder([*encode("\n The cat sat.\nMore text"), causal.vocab.eos_id, *encode(" after")])
    options = hallucination.Options(max_new_tokens=16)
    prompts = [[causal.vocab.bos_id, *encode("a b c")], [causal.vocab.bos_id, *encode("a")]]
    assert hallucination.summarise(scripted, prompts, options) == ["The cat sat."] * 2
    ids, attention, kwargs = scripted.model.calls[0]
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 16
    short = int(attention.sum(1).argmin())
    assert ids[short, 0] == causal.vocab.pad_id and attention[short, 0] == 0 and attention[short, -1] == 1  # left
    scripted.model.tokens = [*encode("One line"), causal.vocab.eos_id, *encode("\nafter")]
    whole = hallucination.Options(paragraph_end="")
    assert hallucination.summarise(scripted, prompts[:1], whole) == ["One line"]  # EOS ends it


def test_the_suite_scores_every_summary_and_writes_them(causal, tiny_causal_dir, tmp_path):
    data = write_articles(tmp_path / "articles.jsonl.gz", 5, gz=True)
    options = hallucination.Options(data=str(data), articles=3, max_new_tokens=8)
    result = hallucination.run(causal, options)
    templates = metric_names("hallucination", options, "causal")  # what a study's metric check accepts
    assert sorted(result.metrics) == sorted(templates)
    metrics = result.metrics
    assert next(iter(metrics)) == "free_rate" and metrics["articles"] == 3 and metrics["truncated"] == 0
    assert 0 <= metrics["lookback_ratio"] <= 1 and "judge/free_rate" not in metrics
    assert len(result.records) == 3 and {r["id"] for r in result.records} <= {f"a{i}" for i in range(5)}
    assert all("\n" not in r["summary"] for r in result.records) and set(result.figures) >= {"rates"}
    out = tmp_path / "eval"
    evaluate(
        [
            "--run",
            str(tiny_causal_dir),
            "--suites",
            "hallucination,multi_needle",
            "--out",
            str(out),
            "--hallucination.data",
            str(data),
            "--hallucination.articles",
            "2",
            "--hallucination.max_new_tokens",
            "4",
            "--hallucination.lookback",
            "false",
            "--multi_needle.lengths",
            "[200]",
            "--multi_needle.needles",
            "[2]",
            "--multi_needle.samples",
            "1",
        ]
    )
    lines = (out / "hallucination@articles.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"id", "summary", "rouge1", "unsupported_names"} <= set(json.loads(lines[0]))
    metrics = json.loads((tiny_causal_dir / "metrics.json").read_text())
    assert "eval/hallucination@articles/free_rate" in metrics and "eval/multi_needle/acc" in metrics
    assert "eval/hallucination@articles/lookback_ratio" not in metrics


def test_a_datasets_source_gives_the_articles_and_its_own_group(tmp_path):
    from datasets import Dataset

    rows = [{"text": f"Article {i}.", "highlights": f"Summary {i}."} for i in range(4)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "news"))
    options = hallucination.Options(
        hf_dataset=str(tmp_path / "news"), document_field="text", reference_field="highlights", articles=4
    )
    articles = hallucination.read_articles(options)
    assert sorted(a.document for a in articles) == [f"Article {i}." for i in range(4)]
    assert {a.id for a in articles} == {f"{tmp_path / 'news'} row {i}" for i in range(4)}  # no id field: the row
    assert group_name("hallucination", options) == "hallucination@news"
    assert group_name("hallucination", hallucination.Options()) == "hallucination"
    with pytest.raises(DataError, match=re.escape("news row 0: no field 'summary'")):
        hallucination.read_articles(hallucination.Options(hf_dataset=str(tmp_path / "news"), document_field="text"))


@pytest.mark.skipif(not XSUM.is_file(), reason="../shared/data/xsum is absent")
def test_real_xsum_articles_are_cut_to_fit_a_small_context(causal):
    result = hallucination.run(causal, hallucination.Options(articles=2, max_new_tokens=8, lookback=False))
    assert result.metrics["truncated"] == 2  # XSum articles are longer than 256 tokens
    assert len({r["id"] for r in result.records}) == 2 and result.records[0]["reference"]


def test_bad_input_is_one_line(causal, tiny_mlm_dir, tmp_path):
    data = write_articles(tmp_path / "a.jsonl", 3)
    cases = [
        (
            hallucination.Options(data=str(data), reference_field="highlights"),
            DataError,
            "a.jsonl:1: no field 'highlights'",
        ),
        (hallucination.Options(data=str(data), articles=4), ConfigError, "hallucination.articles=4 but"),
        (hallucination.Options(data=str(tmp_path / "none.jsonl")), DataError, "hallucination.data: "),
        (
            hallucination.Options(data=str(data), articles=2, max_new_tokens=250),
            ConfigError,
            "leaves no room for an article",
        ),
        (hallucination.Options(data=str(data), articles=2, template="Summarize:"), ConfigError, "has no {doc}"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            hallucination.run(causal, options)
    with pytest.raises(ConfigError, match="hallucination needs a decoder"):
        hallucination.run(load_model(str(tiny_mlm_dir)), hallucination.Options(data=str(data)))


def test_both_suites_run_in_training_through_the_callback(tmp_path):
    """A tiny NTP run with multi_needle and hallucination in its EvaluationCallback (at the end of fit)."""
    from experiments.run import main as train
    from tests.conftest import TINY

    data = write_articles(tmp_path / "articles.jsonl", 3)
    suites = {
        "multi_needle": {"lengths": [200], "needles": [2], "samples": 1},
        "hallucination": {"data": str(data), "articles": 2, "max_new_tokens": 4},
    }
    callbacks = [{"class_path": "callbacks.EvaluationCallback", "init_args": {"suites": suites}}]
    (tmp_path / "suites.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    train(
        [
            "--config",
            "experiments/configs/ntp.yaml",
            "--config",
            str(tmp_path / "suites.yaml"),
            "--experiment",
            "meap_evals",
            "--model.init_args.max_position_embeddings",
            "256",
            *TINY,
            "--runs_dir",
            str(tmp_path / "runs"),
            "--data.cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    run_dir = tmp_path / "runs" / "meap_evals" / "version_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"eval/multi_needle/acc", "eval/hallucination@articles/free_rate"} <= set(metrics)
    assert len((run_dir / "eval" / "hallucination@articles.jsonl").read_text().splitlines()) == 2
