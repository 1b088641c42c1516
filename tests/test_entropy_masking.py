"""Entropy-aware masking: per-position selection, the teacher, distillation, bad input."""

import re

import pytest
import torch

from callbacks.entropy_masking import EntropyMaskingCallback, choose_by_entropy
from core.errors import ConfigError
from datamodules.masking import IGNORE_INDEX
from lightning_modules import MaskedLMModule
from lightning_modules.teacher import load_teacher

TOKENS = ["", "", "", "", ""] + [f"tok{i}" for i in range(35)]
VOCAB = {
    "vocab_size": 40,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "mask_token_id": 4,
    "tokens": TOKENS,
}
TINY = dict(vocab=VOCAB, block_size=8, hidden_size=16, num_layers=1, num_heads=2)


def test_topk_picks_exactly_the_highest_or_lowest_entropy_positions():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 2.0], [1.0, 0.2, 0.8, 0.4, 0.6, 0.0]])
    maskable = torch.tensor([[True, True, True, True, True, False], [True] * 6])
    g = torch.Generator()
    high = choose_by_entropy(entropy, maskable, 0.4, "high", "topk", 1.0, g)
    assert high[0].nonzero().flatten().tolist() == [1, 3]  # 0.4 · 5 maskable = 2; position 5 is special
    assert high[1].nonzero().flatten().tolist() == [0, 2]  # 0.4 · 6 = 2.4 -> 2
    low = choose_by_entropy(entropy, maskable, 0.4, "low", "topk", 1.0, g)
    assert low[0].nonzero().flatten().tolist() == [0, 4] and low[1].nonzero().flatten().tolist() == [1, 5]


def test_sampling_meets_the_budget_and_follows_the_entropy():
    g = torch.Generator().manual_seed(0)
    entropy = torch.linspace(0, 5, 100).expand(2000, 100)
    maskable = torch.ones(2000, 100, dtype=torch.bool)
    chosen = choose_by_entropy(entropy, maskable, 0.15, "high", "sample", 1.0, g)
    assert (chosen.sum(1) == 15).all()
    assert chosen[:, 50:].sum() > 3 * chosen[:, :50].sum()  # higher entropy, chosen more often
    cold = choose_by_entropy(entropy, maskable, 0.15, "high", "sample", 1e-4, g)
    assert cold[:, 85:].all()  # temperature -> 0 is top-k


def save_teacher(module, path):
    module.model.save_pretrained(path)
    return str(path)


def test_kd_is_zero_for_an_identical_teacher_and_positive_otherwise(tmp_path):
    torch.manual_seed(0)
    student = MaskedLMModule(**TINY)
    same = save_teacher(student, tmp_path / "same")
    other = save_teacher(MaskedLMModule(**TINY), tmp_path / "other")
    ids = torch.randint(5, 40, (2, 8))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2] = ids[:, 2]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kd = {}
    for name, path in (("same", same), ("other", other)):
        module = MaskedLMModule(**TINY, distill_from=path, distill_alpha=0.5, distill_temperature=2.0)
        module.model.load_state_dict(student.model.state_dict())
        module.train()
        logits = module(ids, batch["attention_mask"])[labels != IGNORE_INDEX]  # the labelled positions' logits
        kd[name] = module.auxiliary_losses(batch, logits, labels)["kd"].item()
    assert kd["same"] == pytest.approx(0.0, abs=1e-6) and kd["other"] > 1e-4
    assert not any(n.startswith("_teacher") for n in MaskedLMModule(**TINY, distill_from=same).state_dict())


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(tmp_path):
    path = save_teacher(MaskedLMModule(**{**TINY, "vocab": {**VOCAB, "vocab_size": 50}}), tmp_path / "big")
    with pytest.raises(ConfigError, match="the teacher's vocabulary has 50 tokens, the student's 40"):
        load_teacher(path, TOKENS, "model.distill_from")
    from datamodules.tokenizer import train_bpe

    tokenizer = train_bpe(["a small corpus for a small tokenizer"] * 10, 300)
    path = tmp_path / "tok"
    save_teacher(MaskedLMModule(**{**TINY, "vocab": {**VOCAB, "vocab_size": len(tokenizer)}}), path)
    tokenizer.save_pretrained(path)
    shuffled = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    shuffled[10], shuffled[11] = shuffled[11], shuffled[10]
    with pytest.raises(ConfigError, match="tokenizer differs from the student's at 2 of"):
        load_teacher(str(path), shuffled, "model.distill_from")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: MaskedLMModule(**TINY, distill_from="/no/teacher"),
            "model.distill_from: '/no/teacher' is not a saved",
        ),
        (lambda: MaskedLMModule(**TINY, distill_alpha=1.5), "model.distill_alpha must be in [0, 1], got 1.5"),
        (lambda: EntropyMaskingCallback(selection="middle"), "selection must be 'high' or 'low'"),
        (lambda: EntropyMaskingCallback(strategy="sample", temperature=0), "temperature must be > 0, got 0"),
        (lambda: EntropyMaskingCallback(source="teacher"), "teacher_path is required"),
    ],
)
def test_bad_input_names_the_key(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_self_masking_run_chooses_higher_entropy_than_average(tiny_args, tmp_path):
    from experiments.run import main
    from tests.test_run import scalars

    main(["--config", "experiments/configs/entropy_per_position.yaml", *tiny_args, "--trainer.max_steps", "6"])
    logged = scalars(tmp_path / "runs" / "entropy_per_position" / "version_0")
    for step, chosen in logged["mask/entropy_mean_chosen"].items():
        assert chosen > logged["mask/entropy_mean_all"][step]
    assert 0.10 < logged["mask/ratio"][5] < 0.2


class _SetLogits(torch.nn.Module):
    """A 'model' whose logits at each position are set by hand: position j of every row gets a
    distribution whose entropy grows with `spread[j]`."""

    def __init__(self, spread: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.spread, self.vocab_size = spread, vocab_size

    def forward(self, input_ids, attention_mask=None):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        logits[..., 0] = 10.0 * (1 - self.spread)  # spread 0: peaked (low entropy); 1: uniform
        return type("Out", (), {"logits": logits})()


def test_callback_masks_exactly_the_positions_of_highest_entropy_on_a_set_model():
    from types import SimpleNamespace

    from datamodules.policies.entropy import EntropyPositionMask
    from tests.conftest import make_vocab, random_ids

    vocab = make_vocab(64)
    spread = torch.tensor([0.0, 0.9, 0.1, 1.0, 0.2, 0.8, 0.3, 0.7, 0.4, 0.0])
    ids = random_ids(3, 10, vocab)  # BOS ... EOS: positions 1..8 are maskable
    policy = EntropyPositionMask()
    policy.ratio = 0.25  # 0.25 · 8 = 2 per row
    for selection, expected in (("high", [3, 1]), ("low", [2, 4])):
        callback = EntropyMaskingCallback(selection=selection)
        callback.policy, callback._vocab, callback.teacher = policy, None, None
        trainer = SimpleNamespace(datamodule=SimpleNamespace(vocab=vocab), global_step=0)
        module = SimpleNamespace(model=_SetLogits(spread, 64), log_dict=lambda *a, **k: None)
        batch = {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids)}
        callback.on_train_batch_start(trainer, module, batch, 0)
        for row in batch["masked"]:
            assert sorted(row.nonzero().flatten().tolist()) == sorted(expected)
        assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["masked"])


def test_per_type_entropy_from_a_teacher(tiny_args, tmp_path):
    import json

    from experiments.run import main

    main(["--config", "experiments/configs/mlm_random.yaml", *tiny_args, "--trainer.max_steps", "2"])
    teacher = tmp_path / "runs" / "mlm_random" / "version_0" / "hf_model"
    callbacks = json.dumps(
        [
            {
                "class_path": "callbacks.AdaptiveMaskingCallback",
                "init_args": {
                    "every_n_batches": 2,
                    "scoring": "entropy",
                    "entropy_source": "teacher",
                    "teacher_path": str(teacher),
                },
            }
        ]
    )
    cli = main(["--config", "experiments/configs/entropy_per_type.yaml", *tiny_args, "--trainer.callbacks", callbacks])
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "AdaptiveMaskingCallback")
    assert callback.teacher is not None and not cli.model.collect_entropy  # the student computes none
    weights = cli.datamodule.policy.weights
    assert callback.last_update_step == 4 and not torch.allclose(weights, weights.mean().expand_as(weights))


def test_teacher_entropy_source_needs_a_path():
    from callbacks.adaptive_masking import AdaptiveMaskingCallback

    with pytest.raises(ConfigError, match="teacher_path is required with entropy_source='teacher'"):
        AdaptiveMaskingCallback(scoring="entropy", entropy_source="teacher")
