import json
import math
from types import SimpleNamespace

import pytest
import torch

from core.errors import DataError
from datamodules.masking import IGNORE_INDEX, TokenBlock
from datamodules.policies.swap import SecondToLastSwap, swap_pairs
from evaluation import second_to_last
from evaluation.model import LoadedModel, load_model
from evaluation.second_to_last import refine, refine_scores
from experiments.run import main as run_main
from experiments.second_to_last_eval import main
from tests.conftest import PAD, make_vocab


def swap(ids, vocab, block_length=4):
    return SecondToLastSwap(block_length)(TokenBlock.from_ids(torch.tensor(ids), vocab), torch.Generator())


def test_block_swap_on_a_hand_written_sequence(vocab):
    t = list(range(20, 32))  # t0 .. t11
    batch = swap([t], vocab)
    # pairs (3, 4) and (7, 8) swap; (11, 12) does not fit in 12 tokens
    assert batch["input_ids"].tolist() == [[20, 21, 22, 24, 23, 25, 26, 28, 27, 29, 30, 31]]
    labels = [IGNORE_INDEX] * 12
    labels[4], labels[8] = 23, 27  # t3 and t7, one position after the one that predicts them
    assert batch["labels"].tolist() == [labels]
    assert batch["masked"].nonzero()[:, 1].tolist() == [4, 8]
    # the causal module predicts labels[i + 1] from inputs[: i + 1]: at p = 3 it has seen t0 t1 t2 and t4
    inputs = batch["input_ids"][0].tolist()
    assert inputs[:4] == [20, 21, 22, 24] and 23 not in inputs[:4]
    assert inputs[:8] == [20, 21, 22, 24, 23, 25, 26, 28] and 27 not in inputs[:8]


def test_block_length_two_and_padding(vocab):
    batch = swap([[20, 21, 22, 23, 24, 25, PAD, PAD]], vocab, block_length=2)
    # pairs (1, 2), (3, 4), (5, 6), (7, -): the last touches padding and stays
    assert batch["input_ids"].tolist() == [[20, 22, 21, 24, 23, 25, PAD, PAD]]
    assert (batch["labels"] != IGNORE_INDEX).nonzero()[:, 1].tolist() == [2, 4]
    assert swap_pairs(torch.arange(6)[None], 2).tolist() == [[0, 2, 1, 4, 3, 5]]


@pytest.mark.parametrize("bad", [1, 0, -4])
def test_block_length_below_two_is_refused(bad):
    with pytest.raises(ValueError, match=f"data.masking.init_args.block_length must be >= 2, got {bad}"):
        SecondToLastSwap(bad)


def test_refinement_bonus_on_hand_set_logits():
    # candidate 1 is a hair less likely than candidate 0, and only it lets the STL model recover t(n-1)
    logits = torch.tensor([[2.00, 1.99, -5.0, -5.0], [-1.00, -1.02, -9.0, -9.0], [3.0, 1.0, 0.0, 0.0]])
    candidates = torch.tensor([[0, 1], [0, 1], [0, 1]])
    recovered = torch.tensor([[False, True], [False, True], [False, True]])
    # log-probability bonus: + log(1.05) lifts candidate 1 wherever the gap is below 0.0488 nats
    assert refine(logits, candidates, recovered, 0.05).tolist() == [1, 1, 0]
    scores = refine_scores(logits, candidates, recovered, 0.05)
    assert scores[0, 1] - scores[0, 0] == pytest.approx(math.log(1.05) - 0.01, abs=1e-5)
    # the reference multiplies logits: a negative logit gets *lower* (-1.02 -> -1.071), no bonus
    assert refine(logits, candidates, recovered, 0.05, bonus="logit").tolist() == [1, 0, 0]
    assert refine_scores(logits, candidates, recovered, 0.05, "logit")[1, 1].item() == pytest.approx(-1.071)
    # nothing recovered: plain top-1
    assert refine(logits, candidates, torch.zeros_like(recovered), 0.05).tolist() == [0, 0, 0]


def test_eval_compares_against_ntp_and_refines(tiny_args, tmp_path):
    for config in ("ntp", "second_to_last"):
        run_main(["--config", f"experiments/configs/{config}.yaml", *tiny_args, "--trainer.max_steps", "3"])
    runs = tmp_path / "runs"
    result = main(
        [
            "--stl",
            str(runs / "second_to_last" / "version_0"),
            "--ntp",
            str(runs / "ntp" / "version_0" / "hf_model"),
            "--documents",
            "20",
            "--max-blocks",
            "6",
            "--top-k",
            "3",
        ]
    )
    written = json.loads((runs / "second_to_last" / "version_0" / "second_to_last_eval.json").read_text())
    assert written == pytest.approx(result)
    assert result["block_length"] == 4 and result["block_size"] == 32  # from the run's config
    assert result["targets"] == 6 * 7
    assert result["refine_gain"] == pytest.approx(result["refined_top1_acc"] - result["next_token_top1_acc"])
    assert result["acc_gain"] == pytest.approx(result["second_to_last_acc"] - result["next_token_acc_same_targets"])
    # the NTP run scored alone gives the numbers its partner gave: a study's paired differences are the gains
    options = second_to_last.Options(documents=20, max_blocks=6, top_k=3)
    alone = second_to_last.run(load_model(str(runs / "ntp" / "version_0")), options).metrics
    assert alone["acc"] == pytest.approx(result["next_token_acc_same_targets"])
    assert alone["top1_acc"] == pytest.approx(result["next_token_top1_acc"])
    with pytest.raises(DataError, match="is a second-to-last model; name the next-token run"):
        second_to_last.run(load_model(str(runs / "second_to_last" / "version_0")), options)
    for key in (
        "second_to_last_acc",
        "next_token_acc_same_targets",
        "next_token_acc_all",
        "next_token_top1_acc",
        "refined_top1_acc",
        "next_token_top3_recall",
        "stl_recovers_context_share",
    ):
        assert 0.0 <= result[key] <= 1.0


def test_eval_refuses_a_masked_model(tiny_args, tmp_path, capsys):
    run_main(["--config", "experiments/configs/mlm_random.yaml", *tiny_args, "--trainer.max_steps", "1"])
    run = str(tmp_path / "runs" / "mlm_random" / "version_0")
    with pytest.raises(SystemExit) as exit_info:
        main(["--stl", run, "--ntp", run])
    assert exit_info.value.code == 2
    assert "is a masked language model" in capsys.readouterr().err


class Rule(torch.nn.Module):
    """A fake causal model: the logit of token v after input x is `scores[(v - x) mod V]`, else -((v - x) mod V)."""

    def __init__(self, size: int, scores: dict[int, float]) -> None:
        super().__init__()
        self.size, self.scores = size, scores
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        offset = (torch.arange(self.size) - input_ids[..., None]) % self.size  # [B, L, V]
        logits = -offset.float()
        for d, score in self.scores.items():
            logits[offset == d] = score
        return SimpleNamespace(logits=logits)


def test_suite_numbers_on_hand_made_models():
    size = 40
    vocab = make_vocab(size)
    # NTP: next = x + 2, then x + 1 (0.02 less: inside the log(1.05) bonus), then x + 3; STL: the token before x
    ntp = LoadedModel(Rule(size, {2: 1.0, 1: 0.98, 3: 0.5}), None, vocab, "causal")
    stl = LoadedModel(Rule(size, {size - 1: 10.0}), None, vocab, "causal")
    blocks = torch.tensor(
        [
            [5, 7, 8, 9, 10, 11, 12, 13, 14],  # steps of 1: NTP wrong, STL right, refinement fixes both n
            [5, 7, 9, 11, 13, 15, 17, 19, 21],  # steps of 2: NTP right, STL wrong, refinement breaks both n
            [15, 17, 18, 19, 20, 21, 22, 23, 24],
        ]
    )
    # l = 4: swap positions p = 3, 7 (targets t(p)); refined n = 4, 8; 6 targets of each kind
    alone = second_to_last.next_token_scores(ntp, blocks, 4, 3, batch_size=2)
    both = second_to_last.second_to_last_scores(stl, ntp, blocks, 4, 3, 0.05, "logprob", batch_size=2)
    metrics = second_to_last.metrics_of(alone, both, 3)
    expected = {
        "acc": 4 / 6,  # second-to-last: rows 1 and 3
        "top1_acc": 4 / 6,  # refined
        "second_to_last_acc": 4 / 6,
        "next_token_acc_same_targets": 2 / 6,  # row 2 only
        "acc_gain": 2 / 6,
        "next_token_acc_all": (1 + 8 + 1) / 24,  # rows 1 and 3: only the first step is +2
        "next_token_top1_acc": 2 / 6,
        "refined_top1_acc": 4 / 6,
        "refine_gain": 2 / 6,
        "next_token_top3_recall": 1.0,
        "stl_recovers_context_share": 1.0,
    }
    assert metrics == pytest.approx(expected)
    assert list(metrics) == list(expected)
    # the NTP arm alone: its acc and top1_acc are what the STL arm's are compared with
    assert second_to_last.metrics_of(alone, None, 3) == pytest.approx(
        {"acc": 2 / 6, "top1_acc": 2 / 6, "next_token_acc_all": 10 / 24, "next_token_top3_recall": 1.0}
    )
    # the reference's logit bonus: 0.98 x 1.05 = 1.029 > 1.0 also flips to the recovered candidate
    logit = second_to_last.second_to_last_scores(stl, ntp, blocks, 4, 3, 0.05, "logit", batch_size=3)
    assert logit["refined_top1_acc"] == pytest.approx(4 / 6)
