"""MEAP attention analysis: the statistics on hand-set attention, the eager switch, the suite on a
hand-made and a trained tiny model, and the training callback."""

import io
import math
import re

import pytest
import torch

from callbacks.attention_probe import AttentionProbeCallback
from core.errors import ConfigError
from evaluation import attention
from evaluation.attention import (
    SEGMENTS,
    masked_score_decay,
    segment_shares,
    variance_increase,
)
from evaluation.model import load_model
from experiments.run import main
from tests.conftest import TINY
from tests.test_run import scalars

# One layer, one head, L = 4, causal; position 1 is masked. Rows are queries.
CLEAN = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0],
        [0.1, 0.2, 0.3, 0.4],
    ]
)
MASKED = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.8, 0.2, 0.0, 0.0],
        [0.1, 0.1, 0.8, 0.0],
        [0.1, 0.1, 0.2, 0.6],
    ]
)
IS_MASKED = torch.tensor([[False, True, False, False]])
ALL_VALID = torch.ones(1, 4, dtype=torch.bool)


def one_layer(matrix: torch.Tensor) -> torch.Tensor:
    return matrix[None, None, None]  # [layers=1, B=1, H=1, 4, 4]


def test_masked_score_decay_by_hand():
    # queries with the masked key 1 before them (itself excluded): 2 and 3
    clean = (0.3 + 0.2) / 2  # 0.25
    masked = (0.1 + 0.1) / 2  # 0.1
    decay = masked_score_decay(one_layer(CLEAN), one_layer(MASKED), IS_MASKED, ALL_VALID)
    assert decay.clean == pytest.approx(clean)
    assert decay.masked == pytest.approx(masked)
    assert decay.relative == pytest.approx((clean - masked) / clean)  # 0.6
    assert decay.per_layer == pytest.approx([0.6])


def test_variance_increase_by_hand():
    # unmasked keys: query 2 -> {0, 2}; query 3 -> {0, 2, 3}; queries 0 and 1 have one each: skipped
    clean_2 = ((0.2 - 0.35) ** 2 + (0.5 - 0.35) ** 2) / 2  # 0.0225
    clean_3 = ((0.1 - 0.8 / 3) ** 2 + (0.3 - 0.8 / 3) ** 2 + (0.4 - 0.8 / 3) ** 2) / 3  # 0.015556
    masked_2 = ((0.1 - 0.45) ** 2 + (0.8 - 0.45) ** 2) / 2  # 0.1225
    masked_3 = ((0.1 - 0.3) ** 2 + (0.2 - 0.3) ** 2 + (0.6 - 0.3) ** 2) / 3  # 0.046667
    clean, masked = (clean_2 + clean_3) / 2, (masked_2 + masked_3) / 2
    increase = variance_increase(one_layer(CLEAN), one_layer(MASKED), IS_MASKED, ALL_VALID)
    assert increase.clean == pytest.approx(clean)
    assert increase.masked == pytest.approx(masked)
    assert increase.relative == pytest.approx((masked - clean) / clean)  # 3.445


def test_padding_and_layers_count_as_defined():
    # position 3 is padding: query 3 and key 3 drop out, so only query 2 counts
    valid = torch.tensor([[True, True, True, False]])
    assert masked_score_decay(one_layer(CLEAN), one_layer(MASKED), IS_MASKED, valid).relative == pytest.approx(
        (0.3 - 0.1) / 0.3
    )
    # a second layer that masking leaves unchanged: overall means weigh both layers equally
    clean = [one_layer(CLEAN)[0], one_layer(CLEAN)[0]]  # a list of [B, H, L, L], as transformers returns
    masked = [one_layer(MASKED)[0], one_layer(CLEAN)[0]]
    decay = masked_score_decay(clean, masked, IS_MASKED, ALL_VALID)
    assert decay.per_layer == pytest.approx([0.6, 0.0])
    assert decay.relative == pytest.approx((0.25 - (0.1 + 0.25) / 2) / 0.25)  # 0.3


def test_bidirectional_attention_counts_later_keys():
    full = torch.full((4, 4), 0.25)
    dimmed = torch.tensor([0.3, 0.1, 0.3, 0.3]).expand(4, 4)
    # every query but 1 sees the masked key 1: 0.25 clean, 0.1 masked
    decay = masked_score_decay(one_layer(full), one_layer(dimmed), IS_MASKED, ALL_VALID, causal=False)
    assert decay.relative == pytest.approx((0.25 - 0.1) / 0.25)
    # unmasked keys {0, 2, 3} hold equal weights in both runs: no variance, so 0 / 0
    assert math.isnan(
        variance_increase(one_layer(full), one_layer(dimmed), IS_MASKED, ALL_VALID, causal=False).relative
    )


def test_segment_shares_by_hand():
    segments = torch.tensor([[SEGMENTS.index(s) for s in ("other", "context_before", "answer", "query")]])
    query_rows = segments == SEGMENTS.index("query")  # row 3 only
    head_2 = torch.tensor([0.4, 0.2, 0.1, 0.3])
    attn = torch.stack([CLEAN, CLEAN.clone().index_put_((torch.tensor(3),), head_2)])[None, None]  # [1, 1, H=2, 4, 4]
    shares = segment_shares(attn, segments, query_rows)
    assert shares == pytest.approx(
        {
            "context_before": (0.2 + 0.2) / 2,
            "answer": (0.3 + 0.1) / 2,
            "context_after": 0.0,
            "query": (0.4 + 0.3) / 2,
            "other": (0.1 + 0.4) / 2,
        }
    )


# ---- a hand-made model: random tiny Llama and BERT -----------------------------------------------


@pytest.fixture(params=["causal", "mlm"])
def hand_made(request, tiny_causal_dir, tiny_mlm_dir):
    return load_model(str(tiny_causal_dir if request.param == "causal" else tiny_mlm_dir))


def test_eager_switch_returns_weights_and_restores(hand_made):
    model = hand_made.model
    before = model.config._attn_implementation
    ids = torch.tensor([[hand_made.vocab.bos_id, 20, 21, 22, 23, hand_made.vocab.pad_id]])
    attn = torch.stack(attention.attention_probs(model, ids, (ids != hand_made.vocab.pad_id).long()))
    assert model.config._attn_implementation == before == "sdpa"
    assert attn.shape == (2, 1, 4, 6, 6)  # layers, batch, heads, queries, keys
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 1, 4, 6))
    assert attn[..., -1].abs().max() == 0  # nobody attends to padding
    if hand_made.objective == "causal":
        assert attn.triu(1).abs().max() == 0
    with pytest.raises(RuntimeError, match="inside"), attention.eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("inside")
    assert model.config._attn_implementation == before


def test_probe_mask_is_fixed_and_spares_special_tokens(hand_made):
    ids = torch.tensor([[hand_made.vocab.bos_id, *range(20, 219), hand_made.vocab.eos_id]] * 4)  # [4, 201]
    mask = attention.probe_mask(ids, hand_made.vocab, 0.15, seed=3)
    assert torch.equal(mask, attention.probe_mask(ids, hand_made.vocab, 0.15, seed=3))
    assert not torch.equal(mask, attention.probe_mask(ids, hand_made.vocab, 0.15, seed=4))
    assert not mask[:, [0, -1]].any()
    assert 0.1 < mask.float().mean() < 0.2


def test_retrieval_segments_hold_the_gold_fact_and_the_question(tiny_causal_dir):
    loaded = load_model(str(tiny_causal_dir))
    ids, segments = attention.retrieval_batch(loaded, attention.Options(prompts=3, facts=3))
    for row_ids, row_segments in zip(ids, segments):
        text = {name: loaded.tokenizer.decode(row_ids[row_segments == i]) for i, name in enumerate(SEGMENTS)}
        answer = re.fullmatch(r" The (\w+) of (\w+) is (\d{4})\.", text["answer"])
        assert answer, text["answer"]
        assert text["query"] == f" Recall: the {answer[1]} of {answer[2]} is"
        assert text["context_before"].count(f"The {answer[1]} of ") == 1  # 3 facts, the gold one is the second
        assert text["context_after"].count(f"The {answer[1]} of ") == 1
        assert text["other"].startswith(loaded.tokenizer.bos_token)


SMALL = attention.Options(blocks=2, block_size=48, prompts=2)


def check_suite(loaded):
    result = attention.run(loaded, SMALL)
    assert list(result.metrics)[:2] == ["masked_score_decay", "variance_increase"]
    assert {f"share_{s}" for s in SEGMENTS} <= set(result.metrics)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.metrics["masked_score_decay"] != 0  # the masked run really reads other tokens
    assert sum(result.metrics[f"share_{s}"] for s in SEGMENTS) == pytest.approx(1.0, abs=1e-5)
    assert set(result.figures) == {"segments", "per_layer"}
    result.figures["per_layer"].savefig(io.BytesIO(), format="png")
    assert (result.details["probe"]["blocks"], result.details["probe"]["block_size"]) == (2, 48)
    assert len(result.details["masked_score"]["per_layer"]) == loaded.model.config.num_hidden_layers
    assert loaded.model.config._attn_implementation == "sdpa"
    return result


def test_suite_on_a_hand_made_model(hand_made):
    result = check_suite(hand_made)
    assert 0 < result.metrics["share_answer"] < 1  # the gold fact is found in the prompt and attended


def test_options_name_the_key_at_fault(tiny_causal_dir):
    hand_made = load_model(str(tiny_causal_dir))
    with pytest.raises(ConfigError, match=r"attention.mask_ratio must be in \(0, 1\), got 1.5"):
        attention.run(hand_made, attention.Options(mask_ratio=1.5))
    with pytest.raises(ConfigError, match=r"attention.block_size must be in \[2, 256\]"):
        attention.run(hand_made, attention.Options(block_size=1000))
    with pytest.raises(ConfigError, match="attention.facts=40 makes retrieval prompts of"):
        attention.run(hand_made, attention.Options(facts=40))


# ---- training: the callback, and the suite on the trained model -----------------------------------


@pytest.fixture(scope="module")
def meap_attention_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("meap_attention")
    cli = main(
        [
            "--config",
            "experiments/configs/meap_attention.yaml",
            *TINY,
            "--runs_dir",
            str(root / "runs"),
            "--data.cache_dir",
            str(root / "cache"),
        ]
    )
    return cli, root / "runs" / "meap_attention" / "version_0"


def test_callback_logs_the_statistics_every_n_steps_and_at_the_end(meap_attention_run):
    cli, run_dir = meap_attention_run
    logged = scalars(run_dir)
    # every_n_steps=50 in the config, max_steps=4 in TINY: step 0, then the end of training
    for tag in ("masked_score_decay", "variance_increase"):
        for name in (f"attention/{tag}", f"attention/{tag}_layer1", f"attention/{tag}_layer2"):
            assert sorted(logged[name]) == [0, 4], name
            assert all(math.isfinite(v) for v in logged[name].values())
    assert "attention/masked_score_decay_layer3" not in logged  # the tiny model has 2 layers
    assert cli.model.model.config._attn_implementation == "sdpa"


def test_callback_probes_the_original_validation_text(meap_attention_run):
    cli, _ = meap_attention_run
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, AttentionProbeCallback)).probe
    assert probe.shape == (4, 32)  # blocks=4 sequences of TINY's block size
    torch.testing.assert_close(probe, cli.datamodule.val_batches["input_ids"][:4])
    assert not (probe == cli.datamodule.vocab.mask_id).any()


def test_suite_on_a_tiny_trained_model(meap_attention_run):
    _, run_dir = meap_attention_run
    result = check_suite(load_model(str(run_dir)))
    assert 0 < result.metrics["share_answer"] < 1


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        AttentionProbeCallback(every_n_steps=0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\), got 0.0"):
        AttentionProbeCallback(mask_ratio=0.0)
