"""Offline faithfulness scores of a summary against its article (no network, no judge model).

Cheap, reproducible proxies for contextual hallucination, each with known blind spots (see
docs/evaluation.md): unsupported numbers and names (surface checks: a paraphrased number or a name
written differently counts as unsupported; a wrong claim built from the article's own words passes),
novel n-grams (extractiveness, not truth), ROUGE against the reference (overlap, not truth), and the
lookback ratio (Chuang et al. 2024), which reads the model's attention instead of its text.
"""

from __future__ import annotations

import re

import torch
from rouge_score import rouge_scorer
from torch import Tensor

# a number: digits with optional thousands commas and decimals ("1,099", "2.5", "15%": the 15)
_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;][\"')\]]*\s+|\n\s*)[\"'(\[]*$")
_CAPITALISED_RUN = re.compile(r"\b[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)*")
_WORD = re.compile(r"\w+")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def numbers(text: str) -> set[str]:
    """The numbers a text states, normalised: thousands commas dropped (`1,099` = `1099`) and
    trailing decimal zeros removed (`2.50` = `2.5`); percentages and years are numbers too."""
    found = set()
    for match in _NUMBER.findall(text):
        number = match.replace(",", "")
        found.add(number.rstrip("0").rstrip(".") if "." in number else number)
    return found


def unsupported_numbers(summary: str, article: str) -> set[str]:
    return numbers(summary) - numbers(article)


def names(text: str) -> set[str]:
    """Runs of capitalised words (`Prison Link Cymru`), with a sentence's first word left out
    (capitalised by grammar, not because it is a name) and the pronoun `I` ignored."""
    found = set()
    for match in _CAPITALISED_RUN.finditer(text):
        words = match.group().split()
        if _SENTENCE_START.search(text[: match.start()]):
            words = words[1:]
        name = " ".join(w for w in words if w != "I")
        if name:
            found.add(name)
    return found


def unsupported_names(summary: str, article: str) -> set[str]:
    """The summary's names that do not occur in the article as whole words (case-sensitive)."""
    return {n for n in names(summary) if not re.search(rf"(?<!\w){re.escape(n)}(?!\w)", article)}


def novel_ngram_share(summary: str, article: str, n: int) -> float | None:
    """Share of the summary's word n-grams (lower case) absent from the article; None without any."""
    words = lambda text: _WORD.findall(text.lower())
    grams = lambda seq: [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    summary_grams = grams(words(summary))
    if not summary_grams:
        return None
    seen = set(grams(words(article)))
    return sum(g not in seen for g in summary_grams) / len(summary_grams)


def rouge(summaries: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 of each summary against its reference (Google's rouge-score, Porter stemmer)."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(ref, summary) for summary, ref in zip(summaries, references)]
    return {key: [s[key].fmeasure for s in scores] for key in ROUGE_KEYS}


def lookback_ratios(attentions: Tensor, article: slice, generated_from: int) -> Tensor:
    """[G] lookback ratio of each generated token (Chuang et al. 2024), from one sequence's
    attention weights [layers, heads, L, L] over prompt + summary (the summary from position
    `generated_from` on). For the query at generated position q, per layer and head:
    mean attention on the article's tokens / (that + mean attention on generated tokens up to q),
    then averaged over heads and layers. Means, not sums, as in the paper: a long article does not
    win by its size alone."""
    queries = attentions[:, :, generated_from:].float()  # [layers, heads, G, L]
    on_article = queries[..., article].mean(-1)  # [layers, heads, G]
    generated = queries[..., generated_from:]  # [layers, heads, G, G]: causal, zero above the diagonal
    on_generated = generated.sum(-1) / torch.arange(1, generated.shape[-1] + 1, device=generated.device)
    ratio = on_article / (on_article + on_generated).clamp_min(torch.finfo(torch.float32).tiny)
    return ratio.mean((0, 1))
