"""lm-evaluation-harness on masklab's exported `hf_model/` folders, through lm-eval's own `hf` path.

The shipped task YAMLs (evaluation/lm_eval_tasks) must run offline, the log-likelihoods lm-eval
reports must be the ones transformers gives for the same text (so its accuracies mean what
masklab's own evaluations mean), and an encoder must be known not to be a valid lm-eval model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402  (after the skip: lm-eval is an optional dependency)
from lm_eval.tasks import TaskManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "evaluation" / "lm_eval_tasks"
BLIMP_FILE = ROOT.parent / "shared" / "data" / "blimp" / "anaphor_gender_agreement.jsonl.gz"
LIMIT = 8  # documents per task: every masklab_facts example, the first 8 BLiMP pairs


def localise(task_file: Path, data_file: Path, dest: Path) -> None:
    """Copy a shipped task YAML with its data file made absolute: lm-eval resolves `data_files`
    against the working directory, and tests must not depend on it."""
    config = yaml.safe_load(task_file.read_text())
    (split,) = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(data_file)}
    (dest / task_file.name).write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def evaluated(tiny_causal_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `simple_evaluate` run of the shipped tasks on a tiny exported Llama, samples logged."""
    include = tmp_path_factory.mktemp("lm_eval_tasks")
    localise(TASKS / "masklab_facts.yaml", TASKS / "masklab_facts.jsonl", include)
    tasks = ["masklab_facts"]
    if BLIMP_FILE.exists():
        localise(TASKS / "masklab_blimp_local.yaml", BLIMP_FILE, include)
        tasks.append("masklab_blimp_local")
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_causal_dir}",
        tasks=tasks,
        device="cpu",
        batch_size=4,  # several requests per forward: right-padding must not change a score
        limit=LIMIT,
        bootstrap_iters=0,
        log_samples=True,
        # Indexing lm-eval's ~10k built-in task YAMLs costs ~10 s; ours are all this test needs.
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
    )


def reference_loglikelihood(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> float:
    """log p(continuation | context) straight from transformers: the sum of the log-softmax of the
    continuation's tokens. The exported tokenizer puts BOS before a context, as masklab's packed training
    blocks start every document; an empty context is a lone BOS."""
    if context:
        prefix = tokenizer(context).input_ids
        ids = tokenizer(context + continuation).input_ids
        assert ids[: len(prefix)] == prefix, "the context's tokens change when the continuation follows"
    else:
        prefix = [tokenizer.bos_token_id]
        ids = prefix + tokenizer(continuation, add_special_tokens=False).input_ids
    tokens = torch.tensor(ids)
    with torch.no_grad():
        logp = model(tokens[None]).logits[0].double().log_softmax(-1)
    targets = tokens[len(prefix) :]
    return logp[len(prefix) - 1 : -1].gather(-1, targets[:, None]).sum().item()


def test_shipped_tasks_score_an_exported_decoder(evaluated: dict[str, Any]) -> None:
    assert set(evaluated["results"]) == set(evaluated["samples"]) and "masklab_facts" in evaluated["results"]
    for task, result in evaluated["results"].items():
        assert 0.0 <= result["acc,none"] <= 1.0, (task, result)
        assert len(evaluated["samples"][task]) == LIMIT, task


def test_blimp_local_task_reads_the_shared_files(evaluated: dict[str, Any]) -> None:
    if "masklab_blimp_local" not in evaluated["samples"]:
        pytest.skip(f"{BLIMP_FILE} is absent")
    sample = evaluated["samples"]["masklab_blimp_local"][0]
    doc = sample["doc"]
    # Two whole sentences, no leading space (`target_delimiter: ""`), scored from an empty context
    # (lm-eval puts BOS there): `<bos> sentence`, as evaluation/blimp.py scores a decoder.
    assert sample["target"] == 0
    assert sample["arguments"] == [("", doc["sentence_good"]), ("", doc["sentence_bad"])]


def test_lm_eval_loglikelihoods_equal_transformers(evaluated: dict[str, Any], tiny_causal_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_dir)
    theirs, ours = [], []
    for samples in evaluated["samples"].values():
        for sample in samples:
            for (context, continuation), (logprob, _greedy) in zip(sample["arguments"], sample["filtered_resps"]):
                theirs.append(logprob)
                ours.append(reference_loglikelihood(model, tokenizer, context, continuation))
    assert len(theirs) >= 4 * LIMIT
    torch.testing.assert_close(
        torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64), rtol=1e-5, atol=1e-4
    )


def test_decoder_loads_as_a_causal_lm_with_its_context(tiny_causal_dir: Path) -> None:
    lm = HFLM(pretrained=str(tiny_causal_dir), device="cpu")
    assert lm.backend == "causal" and type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.prefix_token_id == lm.tokenizer.bos_token_id  # empty contexts are conditioned on BOS
    assert lm.max_length == 256  # from config.max_position_embeddings, not the tokenizer's 1e30


def test_encoder_is_not_a_valid_lm_eval_model(tiny_mlm_dir: Path) -> None:
    """lm-eval's `hf` model is for causal and seq2seq models. A BERT (or RoBERTa) folder is not
    refused: "bert" is in transformers' causal-LM mapping, so lm-eval loads BertLMHeadModel from
    the masked-LM weights with `is_decoder=False`, i.e. bidirectional attention. Every "next-token"
    log-probability then sees the token it predicts: the numbers it reports are meaningless."""
    lm = HFLM(pretrained=str(tiny_mlm_dir), device="cpu")
    assert lm.backend == "causal" and type(lm.model).__name__ == "BertLMHeadModel"
    assert not lm.model.config.is_decoder
    ids = torch.tensor([[lm.tokenizer.bos_token_id, 50, 60, 70, 80]])
    changed = ids.clone()
    changed[0, -1] = 90
    with torch.no_grad():
        first, second = lm.model(ids).logits[0, 0], lm.model(changed).logits[0, 0]
    assert not torch.allclose(first, second)  # position 0 depends on the last token
