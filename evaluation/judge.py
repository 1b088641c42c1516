"""An LLM judge of summaries through any OpenAI-compatible chat-completions endpoint (optional).

The `openai` client (extra `judge`: pip install -e ".[judge]") talks to a hosted API or a local
vLLM / Ollama server. The key is read from an environment variable whose *name* is the option;
it is never written anywhere. Replies are parsed strictly: anything but exactly one verdict line is
"unparsed", never a pass. Every reply is cached in a JSONL keyed by judge model, prompt hash and
summary hash, so a re-run asks nothing twice and an interrupted run resumes; failed requests (no
reply after the client's retries) are not cached and are asked again next time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

# MEAP's judging protocol (appendix A.5, in our words): model output vs the human-written summary
MEAP_PROMPT = """You are checking a machine-written summary of a news article for hallucinations.

Article:
{article}

Human-written reference summary:
{reference}

Machine-written summary:
{summary}

Does the machine-written summary state anything that is not supported by the article or the \
reference summary (invented facts, numbers, names, events)? Answer with exactly one line \
"Score: 1" if the summary is free of hallucination, or "Score: 0" if it contains any hallucination."""

GROUNDED_PROMPT = """Decide whether every statement of the summary is supported by the article.

Article:
{article}

Summary:
{summary}

Reply in this format:
Problematic Spans: a JSON list of the summary's unsupported text spans ([] if none)
Conclusion: True (every statement is supported) or False (something is not supported)"""

PROMPTS = {"meap": MEAP_PROMPT, "grounded": GROUNDED_PROMPT}
_SCORE = re.compile(r"^\s*\**Score\**\s*:\s*\**\s*([01])\s*\**\s*$", re.MULTILINE | re.IGNORECASE)
_CONCLUSION = re.compile(r"^\s*\**Conclusion\**\s*:\s*\**\s*(True|False)\s*\**\s*\.?\s*$", re.MULTILINE | re.IGNORECASE)
_FIELD = re.compile(r"\{(article|reference|summary)\}")
_SPANS = re.compile(r"^\s*\**Problematic Spans\**\s*:\s*(\[.*\])\s*$", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "pass" (free of hallucination), "fail", "unparsed" or "failed" (no reply)
    reply: str = ""
    spans: tuple[str, ...] = ()  # the grounded prompt's problematic spans
    cached: bool = False


def prompt_text(prompt: str) -> str:
    """A built-in prompt's text, or a prompt file's (with {article}, {summary}, maybe {reference})."""
    if prompt in PROMPTS:
        return PROMPTS[prompt]
    path = Path(prompt)
    if not path.is_file():
        raise ConfigError(f"hallucination.judge_prompt: {prompt!r} is neither {' nor '.join(PROMPTS)} nor a file")
    text = path.read_text()
    if "{summary}" not in text or "{article}" not in text:
        raise ConfigError(f"hallucination.judge_prompt: {prompt} must contain {{article}} and {{summary}}")
    return text


def parse(reply: str, prompt: str) -> Verdict:
    """Exactly one `Score: 0|1` (meap, prompt files) or `Conclusion: True|False` (grounded) line;
    anything else is unparsed."""
    if prompt == "grounded":
        found = _CONCLUSION.findall(reply)
        if len(found) != 1:
            return Verdict("unparsed", reply)
        spans_line = _SPANS.search(reply)
        try:
            spans = tuple(str(s) for s in json.loads(spans_line[1])) if spans_line else ()
        except json.JSONDecodeError:
            spans = ()
        return Verdict("pass" if found[0].lower() == "true" else "fail", reply, spans)
    found = _SCORE.findall(reply)
    if len(found) != 1:
        return Verdict("unparsed", reply)
    return Verdict("pass" if found[0] == "1" else "fail", reply)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wilson(passes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a pass rate: honest at small n and near 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p = passes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Judge:
    """Asks `model` at `base_url` about (article, reference, summary) triples, with a JSONL cache."""

    def __init__(
        self,
        base_url: str,
        model: str,
        key_env: str,
        prompt: str,
        cache: Path | None,
        concurrency: int = 4,
        timeout: float = 60.0,
        retries: int = 3,
    ):
        key = os.environ.get(key_env)
        if not key:
            raise ConfigError(
                f"hallucination.judge_key_env: the environment variable {key_env} holding the judge's key is not set"
            )
        try:
            import openai
        except ImportError:
            raise ConfigError('the judge needs the openai client: pip install -e ".[judge]"') from None
        self.errors = openai.APIError  # connection refused, timeout, an HTTP error after the retries
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=retries)
        self.model, self.prompt, self.template = model, prompt, prompt_text(prompt)
        self.cache, self.concurrency = cache, max(1, concurrency)

    def key(self, article: str, reference: str, summary: str) -> str:
        return f"{self.model}|{digest(self.template)}|{digest(article + chr(0) + reference + chr(0) + summary)}"

    def cached(self) -> dict[str, dict]:
        if self.cache is None or not self.cache.is_file():
            return {}
        return {r["key"]: r for r in map(json.loads, self.cache.read_text().splitlines()) if r.get("key")}

    def ask(self, article: str, reference: str, summary: str) -> Verdict:
        values = {"article": article, "reference": reference, "summary": summary}
        text = _FIELD.sub(lambda m: values[m[1]], self.template)  # one pass: an article's own braces stay
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": text}]
            )
        except self.errors as err:  # the client has retried what it retries
            return Verdict("failed", f"{type(err).__name__}: {err}")
        return parse(response.choices[0].message.content or "", self.prompt)

    def judge(self, triples: list[tuple[str, str, str]], ids: list[str]) -> list[Verdict]:
        """A verdict per (article, reference, summary); cached ones reused, new replies appended to the cache."""
        known = self.cached()
        keys = [self.key(*t) for t in triples]
        todo = [i for i, key in enumerate(keys) if key not in known]
        with ThreadPoolExecutor(self.concurrency) as pool:
            fresh = dict(zip(todo, pool.map(lambda i: self.ask(*triples[i]), todo)))
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            with self.cache.open("a") as out:
                for i, verdict in fresh.items():
                    if verdict.verdict != "failed":
                        record = {"key": keys[i], "id": ids[i], "model": self.model, "verdict": verdict.verdict}
                        out.write(json.dumps(record | {"spans": list(verdict.spans), "reply": verdict.reply}) + "\n")
        return [
            fresh[i] if i in fresh else Verdict(known[k]["verdict"], known[k]["reply"], tuple(known[k]["spans"]), True)
            for i, k in enumerate(keys)
        ]
