"""The LLM judge against a real HTTP server on 127.0.0.1 that scripts its replies: pass, fail with
spans, malformed, 429 then success, 500 until the retries run out, a reply slower than the timeout.
No network: the server is started by the test on a free port."""

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

pytest.importorskip("openai")

from core.errors import ConfigError
from evaluation import hallucination
from evaluation.judge import Judge, parse, wilson
from evaluation.model import load_model
from evaluation.suites import save_results

KEY = "sk-test-secret-4242"


class FakeJudge(BaseHTTPRequestHandler):
    """Replies by the summary's first word (PASS, FAIL, SPANS, MALFORMED, RATE, ERROR, SLOW)."""

    requests: ClassVar[Counter] = Counter()  # shared by the server's handler instances
    seen_keys: ClassVar[set] = set()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.seen_keys.add(self.headers.get("Authorization", ""))
        prompt = body["messages"][0]["content"]
        kind = re.findall(r"summary:\n(\w+)", prompt, re.IGNORECASE)[-1]  # the judged summary's first word
        FakeJudge.requests[kind] += 1
        if kind == "RATE" and FakeJudge.requests[kind] == 1:
            return self.reply(429, {"error": {"message": "slow down"}})
        if kind == "ERROR":
            return self.reply(500, {"error": {"message": "broken"}})
        if kind == "SLOW":
            time.sleep(1.0)
        content = {
            "FAIL": "The summary invents a date.\nScore: 0",
            "SPANS": 'Problematic Spans: ["in 2016"]\nConclusion: False',
            "MALFORMED": "I think it is mostly fine.",
        }.get(kind, "Conclusion: True" if "Conclusion:" in prompt else "Score: 1")
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        self.reply(
            200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]}
        )

    def reply(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("retry-after-ms", "10")  # the client waits 10 ms before a retry
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeJudge.requests, FakeJudge.seen_keys = Counter(), set()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    return "JUDGE_KEY"


def test_replies_are_parsed_strictly():
    assert parse("Score: 1", "meap").verdict == "pass" and parse("**Score:** 0", "meap").verdict == "fail"
    assert parse("Score: 1\nScore: 0", "meap").verdict == "unparsed"  # two verdicts: neither counts
    assert parse("The score is 1", "meap").verdict == "unparsed"
    grounded = parse('Problematic Spans: ["in 2016", "Smith"]\nConclusion: False', "grounded")
    assert grounded.verdict == "fail" and grounded.spans == ("in 2016", "Smith")
    assert parse("Conclusion: True.", "grounded").verdict == "pass" and parse("True", "grounded").verdict == "unparsed"


def test_wilson_interval():
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 20)[0] == 0 and wilson(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)


def test_scripted_replies_retries_timeouts_and_the_cache(server, key, tmp_path):
    kinds = ["PASS", "FAIL", "MALFORMED", "RATE", "ERROR", "SLOW"]
    triples = [("An article.", "A reference.", f"{k} summary.") for k in kinds]
    cache = tmp_path / "cache.jsonl"
    judge = Judge(server, "judge-1", key, "meap", cache, concurrency=3, timeout=0.5, retries=1)
    verdicts = judge.judge(triples, kinds)
    assert [v.verdict for v in verdicts] == ["pass", "fail", "unparsed", "pass", "failed", "failed"]
    assert FakeJudge.requests == Counter(PASS=1, FAIL=1, MALFORMED=1, RATE=2, ERROR=2, SLOW=2)  # 1 retry each
    assert FakeJudge.seen_keys == {f"Bearer {KEY}"}
    again = Judge(server, "judge-1", key, "meap", cache, retries=0).judge(triples[:4], kinds[:4])
    assert [v.verdict for v in again] == ["pass", "fail", "unparsed", "pass"] and all(v.cached for v in again)
    assert sum(FakeJudge.requests.values()) == 9  # the re-run asked nothing
    other = Judge(server, "judge-2", key, "meap", cache, retries=0).judge(triples[:1], kinds[:1])
    assert not other[0].cached and FakeJudge.requests["PASS"] == 2  # the cache is keyed by the judge model
    assert KEY not in cache.read_text()


def test_the_grounded_prompt_and_a_prompt_file(server, key, tmp_path):
    judge = Judge(server, "judge-1", key, "grounded", None, retries=0)
    verdicts = judge.judge([("Art.", "Ref.", "SPANS x"), ("Art.", "Ref.", "PASS x")], ["a", "b"])
    assert [(v.verdict, v.spans) for v in verdicts] == [("fail", ("in 2016",)), ("pass", ())]
    with pytest.raises(ConfigError, match="hallucination.judge_prompt: 'nope.txt' is neither meap nor grounded"):
        Judge(server, "judge-1", key, "nope.txt", None)
    (tmp_path / "p.txt").write_text("Judge {summary}.")
    with pytest.raises(ConfigError, match="must contain {article} and {summary}"):
        Judge(server, "judge-1", key, str(tmp_path / "p.txt"), None)


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    return load_model(str(tiny_causal_dir))


def articles(tmp_path, count=3):
    lines = [
        json.dumps({"document": f"Story {i} about Cardiff.", "summary": "Cardiff.", "id": str(i)}) for i in range(count)
    ]
    (tmp_path / "articles.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "articles.jsonl")


def test_the_suite_with_a_judge_never_writes_the_key(server, key, causal, tmp_path):
    run_dir = tmp_path / "run"
    options = hallucination.Options(
        data=articles(tmp_path),
        articles=3,
        max_new_tokens=4,
        lookback=False,
        judge_model="judge-1",
        judge_url=server,
        judge_key_env=key,
        judge_cache=str(run_dir / "eval" / "judge.jsonl"),
    )
    result = hallucination.run(causal, options)
    assert result.metrics["judge/free_rate"] == 1.0 and result.metrics["judge/judged"] == 3
    assert result.metrics["judge/free_rate_low"] == pytest.approx(wilson(3, 3)[0])
    save_results({"hallucination": result}, run_dir / "eval", run_dir / "metrics.json")
    assert hallucination.run(causal, options).metrics["judge/judged"] == 3 and sum(FakeJudge.requests.values()) == 3
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 4 and not any(KEY.encode() in p.read_bytes() for p in files)


def test_a_missing_key_stops_before_generation(causal, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    monkeypatch.setattr(hallucination, "summarise", lambda *a: pytest.fail("generated before checking the key"))
    options = hallucination.Options(
        data=articles(tmp_path), articles=2, judge_model="m", judge_key_env="NO_SUCH_JUDGE_KEY"
    )
    with pytest.raises(
        ConfigError, match="the environment variable NO_SUCH_JUDGE_KEY holding the judge's key is not set"
    ):
        hallucination.run(causal, options)


def test_a_refused_connection_counts_as_failed_and_the_offline_scores_stay(key, causal, tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = hallucination.Options(
        data=articles(tmp_path),
        articles=2,
        max_new_tokens=4,
        lookback=False,
        judge_model="m",
        judge_url=f"http://127.0.0.1:{port}/v1",
        judge_key_env=key,
        judge_retries=0,
        judge_cache=str(tmp_path / "cache.jsonl"),
    )
    metrics = hallucination.run(causal, options).metrics
    assert metrics["judge/failed"] == 2 and metrics["judge/judged"] == 0 and "free_rate" in metrics
    assert not (tmp_path / "cache.jsonl").exists() or not (tmp_path / "cache.jsonl").read_text()
