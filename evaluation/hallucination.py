"""hallucination: does the model invent things when it summarises real articles? (MEAP §4.1.5, Table 4)

`articles` articles (default 100 of the 1,000 XSum test articles of ../shared/data/xsum, drawn with
a fixed seed, as in the paper) are summarised greedily after the paper's prompt ("Summarize the
following article: {doc}"), inside the tokenizer's chat template when it has one. An article too
long for the context is cut at its end, leaving room for `max_new_tokens`; the summary stops at
EOS or the end of its first paragraph. Every summary is scored offline (evaluation/faithfulness.py:
unsupported numbers and names, novel n-grams, ROUGE against the reference, the lookback ratio of
the model's attention) and, when `judge_model` is set, by an LLM judge (evaluation/judge.py).
Scores read the article as the model saw it (cut, when it was cut). Decoders only.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from core.errors import ConfigError, DataError
from datamodules.sources import open_hf_split
from evaluation import faithfulness
from evaluation.attention import attention_probs
from evaluation.judge import Judge, Verdict, wilson
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult
from evaluation.scoring import _chunks_by_length, pad

DEFAULT_DATA = "../shared/data/xsum/xsum-1000.jsonl.gz"
PLACEHOLDER = "\x00ARTICLE\x00"  # stands for the article while the template is rendered and split


@dataclass
class Options:
    """Which articles, how summaries are generated, and the optional LLM judge.

    Args:
        data: JSONL (or .jsonl.gz) of articles with their reference summaries; relative to the working directory.
        hf_dataset: a `datasets` source instead of `data` (a save_to_disk folder or a hub id).
        hf_split: the split of `hf_dataset`.
        document_field: the record field holding the article.
        reference_field: the record field holding the reference summary.
        id_field: the record field naming the article (its file and line, or row, when absent).
        articles: how many articles, drawn without replacement with `seed`.
        seed: seed of the draw.
        template: the prompt; {doc} is replaced by the article.
        chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        max_new_tokens: the longest summary, in tokens; the article is cut to leave this much room.
        paragraph_end: the summary ends before the first occurrence of this text (after leading whitespace).
        batch_size: prompts per generate call.
        lookback: compute the lookback ratio (one eager-attention forward pass per summary).
        judge_model: the judge's model name at `judge_url`; None = no judge (offline).
        judge_url: base URL of an OpenAI-compatible API (a hosted one, or a local vLLM / Ollama server's /v1).
        judge_key_env: name of the environment variable holding the judge's API key (never the key itself).
        judge_prompt: `meap` (output vs the human summary, Score: 0|1), `grounded` (every statement supported
            by the article? Conclusion: True|False and the problematic spans) or a prompt file.
        judge_concurrency: judge requests in flight at once.
        judge_timeout: seconds before a judge request is abandoned (then retried).
        judge_retries: retries of a request that timed out, could not connect, or got 429 / 5xx.
        judge_cache: JSONL cache of judgements; None = <run dir>/eval/hallucination_judge_cache.jsonl
            (no cache for a model without a folder).
    """

    data: str = DEFAULT_DATA
    hf_dataset: str | None = None
    hf_split: str = "test"
    document_field: str = "document"
    reference_field: str = "summary"
    id_field: str = "id"
    articles: int = 100
    seed: int = 0
    template: str = "Summarize the following article: {doc}"
    chat_template: bool = True
    max_new_tokens: int = 64
    paragraph_end: str = "\n"
    batch_size: int = 8
    lookback: bool = True
    judge_model: str | None = None
    judge_url: str = "https://api.openai.com/v1"
    judge_key_env: str = "OPENAI_API_KEY"
    judge_prompt: str = "meap"
    judge_concurrency: int = 4
    judge_timeout: float = 60.0
    judge_retries: int = 3
    judge_cache: str | None = None


@dataclass(frozen=True)
class Article:
    id: str
    document: str
    reference: str


def records(options: Options) -> Iterator[tuple[str, dict]]:
    """(where, record) of the data file's lines, or of the `datasets` source's rows."""
    if options.hf_dataset:
        for number, row in enumerate(open_hf_split(options.hf_dataset, None, options.hf_split)):
            yield f"{options.hf_dataset} row {number}", row
        return
    path = Path(options.data)
    if not path.is_file():
        raise DataError(f"hallucination.data: {options.data!r} is not a file")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield f"{path}:{number}", json.loads(line)


def read_articles(options: Options) -> list[Article]:
    """`options.articles` records of the data, drawn with `options.seed`."""
    fields = (options.document_field, options.reference_field)
    articles = []
    for where, record in records(options):
        missing = [f for f in fields if f not in record]
        if missing:
            raise DataError(f"{where}: no field {', '.join(map(repr, missing))} (hallucination.*_field)")
        articles.append(Article(str(record.get(options.id_field, where)), *(str(record[f]) for f in fields)))
    source = options.hf_dataset or options.data
    if not 1 <= options.articles <= len(articles):
        raise ConfigError(f"hallucination.articles={options.articles} but {source} holds {len(articles)} articles")
    chosen = np.random.default_rng(options.seed).choice(len(articles), options.articles, replace=False)
    return [articles[i] for i in chosen]


def prompt_parts(loaded: LoadedModel, options: Options) -> tuple[list[int], list[int]]:
    """The prompt's token ids before and after the article (chat template applied when asked and present)."""
    if "{doc}" not in options.template:
        raise ConfigError(f"hallucination.template {options.template!r} has no {{doc}}")
    text = options.template.replace("{doc}", PLACEHOLDER)
    tokenizer = loaded.tokenizer
    if options.chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        before, after = rendered.split(PLACEHOLDER)
        start = []
    else:
        (before, after), start = text.split(PLACEHOLDER), [loaded.vocab.bos_id]
    encode = lambda part: tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
    return start + encode(before), encode(after)


def build_prompts(
    loaded: LoadedModel, options: Options, articles: list[Article]
) -> tuple[list[list[int]], list[slice], list[str]]:
    """Each prompt's ids, where its article's tokens are, and the article as the model sees it
    (cut at its end when prompt + `max_new_tokens` would not fit the context)."""
    before, after = prompt_parts(loaded, options)
    room = loaded.context_length - options.max_new_tokens - len(before) - len(after)
    if room < 1:
        raise ConfigError(
            f"hallucination: a context of {loaded.context_length} tokens leaves no room for an article after the "
            f"prompt's {len(before) + len(after)} tokens and max_new_tokens={options.max_new_tokens}"
        )
    documents = loaded.tokenizer([a.document for a in articles], add_special_tokens=False)["input_ids"]
    prompts, spans, seen = [], [], []
    for article, ids in zip(articles, documents):
        kept = ids[:room]
        prompts.append([*before, *kept, *after])
        spans.append(slice(len(before), len(before) + len(kept)))
        seen.append(article.document if len(kept) == len(ids) else loaded.tokenizer.decode(kept))
    return prompts, spans, seen


@torch.no_grad()
def summarise(loaded: LoadedModel, prompts: list[list[int]], options: Options) -> list[str]:
    """Greedy summaries, batched with left padding, each cut at EOS and at the end of its first paragraph."""
    vocab = loaded.vocab
    texts = [""] * len(prompts)
    for chunk in _chunks_by_length([len(p) for p in prompts], options.batch_size):
        ids, attention = pad([prompts[i] for i in chunk], vocab.pad_id, left=True)
        output = loaded.model.generate(
            input_ids=ids.to(loaded.device),
            attention_mask=attention.to(loaded.device),
            max_new_tokens=options.max_new_tokens,
            do_sample=False,
            pad_token_id=vocab.pad_id,
            eos_token_id=vocab.eos_id,
        )[:, ids.shape[1] :].tolist()
        for row, i in enumerate(chunk):
            tokens = output[row][: output[row].index(vocab.eos_id)] if vocab.eos_id in output[row] else output[row]
            text = loaded.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
            texts[i] = text.split(options.paragraph_end)[0].strip() if options.paragraph_end else text.strip()
    return texts


def lookback(loaded: LoadedModel, prompts: list[list[int]], spans: list[slice], summaries: list[str]) -> list[float]:
    """Each summary's mean lookback ratio over its tokens (nan for an empty summary), teacher-forced
    on prompt + summary with eager attention."""
    ratios = []
    for prompt, span, summary in zip(prompts, spans, summaries):
        tokens = loaded.tokenizer(summary, add_special_tokens=False)["input_ids"][: loaded.context_length - len(prompt)]
        if not tokens:
            ratios.append(float("nan"))
            continue
        ids = torch.tensor([[*prompt, *tokens]], device=loaded.device)
        layers = attention_probs(loaded.model, ids, torch.ones_like(ids))  # each [1, H, L, L]: one "layer" at a time
        per_layer = torch.stack([faithfulness.lookback_ratios(layer, span, len(prompt)) for layer in layers])
        ratios.append(float(per_layer.mean()))  # every layer has as many heads: the mean over heads and layers
    return ratios


def judge_of(loaded: LoadedModel, options: Options) -> Judge | None:
    """The judge, built (and its key checked) before any generation; None when `judge_model` is unset."""
    if options.judge_model is None:
        return None
    cache = options.judge_cache
    if cache is None and loaded.path is not None:
        run_dir = loaded.path.parent if (loaded.path.parent / "config.yaml").is_file() else loaded.path
        cache = str(run_dir / "eval" / "hallucination_judge_cache.jsonl")
    return Judge(
        options.judge_url,
        options.judge_model,
        options.judge_key_env,
        options.judge_prompt,
        Path(cache) if cache else None,
        options.judge_concurrency,
        options.judge_timeout,
        options.judge_retries,
    )


def judge_metrics(verdicts: list[Verdict]) -> dict[str, float]:
    """The judged free-of-hallucination rate over answered articles (unparsed replies count as not
    free), its Wilson 95% interval, and the counts; failed requests are left out of the rate."""
    count = lambda kind: sum(v.verdict == kind for v in verdicts)
    passes, answered = count("pass"), len(verdicts) - count("failed")
    low, high = wilson(passes, answered)
    return {
        "judge/free_rate": passes / answered if answered else float("nan"),
        "judge/free_rate_low": low,
        "judge/free_rate_high": high,
        "judge/judged": float(count("pass") + count("fail")),
        "judge/unparsed": float(count("unparsed")),
        "judge/failed": float(count("failed")),
    }


def figures(metrics: dict[str, float], ratios: list[float]) -> dict[str, Any]:
    """Rate per score (bar chart) and the lookback ratio's histogram over summaries."""
    rates = {
        "offline free": metrics["free_rate"],
        "no unsupported number": 1 - metrics["unsupported_numbers"],
        "no unsupported name": 1 - metrics["unsupported_names"],
    }
    if "judge/free_rate" in metrics:
        rates["judge free"] = metrics["judge/free_rate"]
    bars, axes = plt.subplots(figsize=(5.5, 3.2))
    axes.barh(list(rates), list(rates.values()), color="tab:green")
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of summaries")
    axes.set_title("hallucination: rate per score")
    bars.tight_layout()
    out = {"rates": bars}
    finite = [r for r in ratios if np.isfinite(r)]
    if finite:
        histogram, axes = plt.subplots(figsize=(5.5, 3.2))
        axes.hist(finite, bins=20, range=(0, 1), color="tab:blue")
        axes.set_xlabel("lookback ratio (mean over a summary's tokens)")
        axes.set_ylabel("summaries")
        axes.set_title("hallucination: lookback ratio")
        histogram.tight_layout()
        out["lookback"] = histogram
    return out


def mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else float("nan")


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes, so a study can check its metric names before training."""
    names = ["free_rate", "unsupported_numbers", "unsupported_names", *(f"novel_{n}gram" for n in (1, 2, 3))]
    names += [*faithfulness.ROUGE_KEYS, "articles", "truncated", "empty", "summary_words"]
    names += ["lookback_ratio"] if options.lookback else []
    if options.judge_model:
        judged = ("free_rate", "free_rate_low", "free_rate_high", "judged", "unparsed", "failed")
        names += [f"judge/{k}" for k in judged]
    return names


def run(loaded: LoadedModel, options: Options) -> SuiteResult:
    if loaded.objective != "causal":
        raise ConfigError("hallucination needs a decoder: it generates summaries, which a masked LM does not")
    judge = judge_of(loaded, options)  # a missing key stops here, before any generation
    articles = read_articles(options)
    prompts, spans, seen = build_prompts(loaded, options, articles)
    summaries = summarise(loaded, prompts, options)
    numbers = [faithfulness.unsupported_numbers(s, a) for s, a in zip(summaries, seen)]
    names = [faithfulness.unsupported_names(s, a) for s, a in zip(summaries, seen)]
    novel = {n: [faithfulness.novel_ngram_share(s, a, n) for s, a in zip(summaries, seen)] for n in (1, 2, 3)}
    rouge = faithfulness.rouge(summaries, [a.reference for a in articles])
    ratios = lookback(loaded, prompts, spans, summaries) if options.lookback else []
    verdicts = (
        judge.judge([(a, r.reference, s) for a, r, s in zip(seen, articles, summaries)], [a.id for a in articles])
        if judge
        else []
    )
    truncated = [len(a.document) != len(s) for a, s in zip(articles, seen)]
    metrics = {
        "free_rate": float(np.mean([not n and not m for n, m in zip(numbers, names)])),
        "unsupported_numbers": float(np.mean([bool(n) for n in numbers])),
        "unsupported_names": float(np.mean([bool(m) for m in names])),
    }
    metrics |= {f"novel_{n}gram": mean(shares) for n, shares in novel.items()}
    metrics |= {key: float(np.mean(values)) for key, values in rouge.items()}
    if options.lookback:
        metrics["lookback_ratio"] = mean(ratios)
    metrics |= judge_metrics(verdicts) if judge else {}
    metrics |= {
        "articles": float(len(articles)),
        "truncated": float(sum(truncated)),
        "empty": float(sum(not s for s in summaries)),
        "summary_words": float(np.mean([len(s.split()) for s in summaries])),
    }
    records = [
        {
            "id": a.id,
            "summary": s,
            "reference": a.reference,
            "truncated": t,
            "unsupported_numbers": sorted(n),
            "unsupported_names": sorted(m),
            **{f"novel_{k}gram": novel[k][i] for k in novel},
            **{key: rouge[key][i] for key in rouge},
            **({"lookback_ratio": ratios[i]} if options.lookback else {}),
            **({"judge": verdicts[i].verdict, "judge_spans": list(verdicts[i].spans)} if judge else {}),
        }
        for i, (a, s, t, n, m) in enumerate(zip(articles, summaries, truncated, numbers, names))
    ]
    table = "\n".join(["| metric | value |", "| --- | --- |", *(f"| {k} | {v:.4g} |" for k, v in metrics.items())])
    details = {"judge": {"model": options.judge_model, "prompt": options.judge_prompt} if judge else None}
    return SuiteResult(metrics, figures(metrics, ratios), table, details, records)
