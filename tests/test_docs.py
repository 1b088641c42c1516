"""The docs stay true: docs/extending.md's examples run and do what they say, and every relative
link in README.md and docs/*.md points to a file (and heading) that exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(page: Path) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == "python"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        base, n = slug(heading), 0
        while (candidate := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


@pytest.fixture(scope="module")
def extending(tmp_path_factory) -> dict:
    """The namespace left by running every python block of docs/extending.md in order, in an
    empty working directory (the examples write a tokenizer cache, eval/ and metrics.json)."""
    namespace: dict = {"__name__": "docs_extending"}
    work = tmp_path_factory.mktemp("extending")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        for i, code in enumerate(python_blocks(ROOT / "docs" / "extending.md")):
            exec(compile(code, f"docs/extending.md (python block {i + 1})", "exec", dont_inherit=True), namespace)
    namespace["work"] = work
    return namespace


def test_the_example_policy_masks_exactly_its_budget(extending):
    ids, vocab, batch = extending["ids"], extending["vocab"], extending["batch"]
    masked = batch["masked"]
    assert masked.sum(1).tolist() == [2, 1]  # round(0.25 * 8), round(0.25 * 4)
    assert not (masked & vocab.is_special[ids]).any()
    assert torch.equal(batch["labels"], ids.masked_fill(~masked, -100))
    causal = extending["ExactCountMask"](objective="causal")
    causal.ratio = 0.5
    out = causal(extending["TokenBlock"].from_ids(ids, vocab), torch.Generator().manual_seed(1))
    assert out["masked"].sum(1).tolist() == [4, 2]
    assert torch.equal(out["input_ids"], ids.masked_fill(out["masked"], vocab.mask_id))
    assert torch.equal(out["labels"], ids.masked_fill(ids == vocab.pad_id, -100))


def test_the_example_statistics_policy_gets_the_counts_once_and_masks_the_rarest(extending):
    data, batch = extending["rare_data"], extending["rare_batch"]
    assert len(list((extending["work"] / ".cache" / "masklab" / "stats").glob("*.pt"))) == 1
    blocks = torch.from_numpy(data.train_blocks.astype("int64"))
    regular = ~data.vocab.is_special[blocks]
    counts = data.policy.counts
    assert torch.equal(counts, torch.bincount(blocks[regular], minlength=data.vocab.size).float())
    ids, masked = batch["input_ids"], batch["masked"]
    maskable = ~data.vocab.is_special[batch["labels"].where(masked, ids)]  # the clean ids' specials
    assert masked.sum(1).tolist() == (0.15 * maskable.sum(1)).round().long().tolist()
    clean = batch["labels"].where(masked, ids)
    for row in range(len(ids)):  # every masked type is at most as frequent as every unmasked one
        assert counts[clean[row][masked[row]]].max() <= counts[clean[row][maskable[row] & ~masked[row]]].min()


def test_the_example_callback_sets_the_ratio_from_the_accuracy(extending):
    curriculum, data = extending["curriculum"], extending["data"]
    assert extending["trainer"].global_step == 3
    assert 0.0 <= curriculum.accuracy <= 1.0
    assert data.policy.ratio == pytest.approx(0.1 + 0.3 * curriculum.accuracy, abs=1e-6)
    assert data.policy.ratio != pytest.approx(0.15)  # the ratio it started from
    pairing_errors = extending["pairing_errors"]
    assert pairing_errors(data.policy, [curriculum]) == []
    [error] = pairing_errors(extending["PenultimateTokenMask"](), [curriculum])
    assert error.startswith("AccuracyCurriculum changes the mask ratio, but data.masking=PenultimateTokenMask has none")


def test_the_example_suite_stores_its_metrics(extending):
    metrics = json.loads((extending["work"] / "metrics.json").read_text())
    assert set(metrics) == {"eval/topk/top5_acc", "eval/topk/top1_acc"}
    assert 0.0 <= metrics["eval/topk/top1_acc"] <= metrics["eval/topk/top5_acc"] <= 1.0
    assert (extending["work"] / "eval" / "topk.md").is_file()
    size = extending["loaded"].vocab.size
    every = extending["run"](extending["loaded"], extending["Options"](k=size, max_blocks=2))
    assert every.metrics[f"top{size}_acc"] == 1.0  # k = the whole vocabulary: always right


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_the_front_door_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000, f"README.md has {len(readme)} characters; move detail to docs/"
    assert "python -m pytest -n 2" in readme
    assert "python -m pytest -n 2" in (ROOT / ".ci" / "run").read_text()
