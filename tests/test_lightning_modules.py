import pytest
import torch

from core.errors import ConfigError
from datamodules.masking import IGNORE_INDEX
from lightning_modules import CausalLMModule, MaskedLMModule, OptimizerConfig

VOCAB = {"vocab_size": 40, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "mask_token_id": 4}
TINY = dict(vocab=VOCAB, block_size=8, hidden_size=16, num_layers=2, num_heads=2)


def by_hand(logits: torch.Tensor, targets: list[tuple[int, int, int]]) -> torch.Tensor:
    """Mean of -log softmax(logits[b, t])[y] over the (b, t, y) listed."""
    losses = [-(logits[b, t].exp() / logits[b, t].exp().sum()).log()[y] for b, t, y in targets]
    return torch.stack(losses).mean()


def toy_batch():
    input_ids = torch.tensor([[1, 7, 4, 9, 11, 2, 0, 0], [1, 5, 6, 4, 8, 12, 13, 2]])
    return input_ids, torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])


def test_mlm_loss_equals_hand_computation():
    torch.manual_seed(0)
    module = MaskedLMModule(**TINY).eval()
    input_ids, attention_mask = toy_batch()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 2], labels[1, 3], labels[1, 5] = 8, 30, 12
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    loss, accuracy, count = module.loss(batch)
    logits = module(input_ids, attention_mask)
    torch.testing.assert_close(loss, by_hand(logits, [(0, 2, 8), (1, 3, 30), (1, 5, 12)]))
    assert count.item() == 3
    predicted = logits.argmax(-1)
    expected_acc = sum(int(predicted[b, t] == y) for b, t, y in [(0, 2, 8), (1, 3, 30), (1, 5, 12)]) / 3
    assert accuracy.item() == pytest.approx(expected_acc)


def test_causal_loss_predicts_the_next_token_and_skips_padding():
    torch.manual_seed(0)
    module = CausalLMModule(**TINY).eval()
    input_ids, attention_mask = toy_batch()
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    meap_input = input_ids.clone()
    meap_input[1, 3] = 4  # a MEAP-masked input token; its original stays the target
    loss, _, count = module.loss({"input_ids": meap_input, "attention_mask": attention_mask, "labels": labels})
    logits = module(meap_input, attention_mask)
    targets = [(b, t, int(labels[b, t + 1])) for b in range(2) for t in range(7) if labels[b, t + 1] != IGNORE_INDEX]
    assert count.item() == len(targets) == 5 + 7
    torch.testing.assert_close(loss, by_hand(logits, targets))


def test_batch_with_nothing_to_predict_gives_zero_not_nan():
    module = MaskedLMModule(**TINY)
    input_ids, attention_mask = toy_batch()
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.full_like(input_ids, IGNORE_INDEX),
    }
    loss, accuracy, count = module.loss(batch)
    assert loss.item() == 0.0 and accuracy.item() == 0.0 and count.item() == 0
    loss.backward()  # still a valid graph


def test_a_nan_validation_batch_makes_val_loss_nan_not_the_mean_of_the_rest():
    """torchmetrics' default drops NaN updates; val/loss must keep them so the non-finite check fires."""
    module = CausalLMModule(**TINY)
    module.val_loss.update(torch.tensor(2.0), 10)
    module.val_loss.update(torch.tensor(float("nan")), 10)
    assert module.val_loss.compute().isnan()


@pytest.mark.parametrize("module_class", [MaskedLMModule, CausalLMModule])
def test_loss_falls_on_a_repeated_batch(module_class):
    torch.manual_seed(0)
    module = module_class(**TINY)
    input_ids, attention_mask = toy_batch()
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = module.loss(batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("module_class", "extra", "usable"),
    [(CausalLMModule, {}, 64), (MaskedLMModule, {"arch": "bert"}, 64), (MaskedLMModule, {"arch": "roberta"}, 63)],
)
def test_block_size_beyond_the_models_positions_is_refused(module_class, extra, usable):
    args = {**TINY, **extra, "max_position_embeddings": 64}
    module_class(**{**args, "block_size": usable})
    with pytest.raises(ConfigError, match=f"data.block_size={usable + 1} is larger than the model's {usable} usable"):
        module_class(**{**args, "block_size": usable + 1})


def test_every_shape_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        CausalLMModule(**{**TINY, "hidden_size": 30, "num_heads": 4, "num_kv_heads": 3, "block_size": 4096})
    assert len(err.value.errors) == 3
    assert "model.num_heads=4 is not divisible by model.num_kv_heads=3" in str(err.value)


def test_missing_vocab_is_explained():
    with pytest.raises(ConfigError, match="model.vocab is not set"):
        CausalLMModule(vocab=None)


def test_llama_shape_comes_from_the_config():
    module = CausalLMModule(**{**TINY, "num_kv_heads": 1, "hidden_size": 32}, rope_theta=500.0)
    config = module.model.config
    assert config.model_type == "llama" and config.num_key_value_heads == 1
    assert config.rope_parameters["rope_theta"] == 500.0
    assert config.intermediate_size == 64  # 8/3 * 32 rounded to a multiple of 64


def test_weight_decay_skips_norms_biases_and_embeddings():
    module = MaskedLMModule(**TINY, optimizer=OptimizerConfig(weight_decay=0.3))
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    embedding = module.model.get_input_embeddings().weight
    assert any(p is embedding for p in no_decay["params"])


def test_predictive_entropy_of_known_distributions():
    from lightning_modules.base import predictive_entropy

    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1e4, -1e4], [1e4, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(predictive_entropy(logits), torch.tensor([4.0, 2.0, 1.0]).log())


def test_token_stats_line_up_with_the_labels_they_score():
    torch.manual_seed(0)
    module = CausalLMModule(**TINY).eval()
    module.collect_entropy = True
    input_ids, attention_mask = toy_batch()
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    loss, stats = module.step({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    assert torch.equal(stats.labels, labels[:, 1:]) and torch.equal(stats.inputs, input_ids[:, 1:])
    logits = module(input_ids, attention_mask)[:, :-1]
    log_p = logits.log_softmax(-1)
    b, t = 1, 3  # predicts labels[1, 4] from the prefix up to position 3
    torch.testing.assert_close(stats.loss[b, t], -log_p[b, t, labels[b, t + 1]])
    torch.testing.assert_close(stats.entropy[b, t], -(log_p[b, t].exp() * log_p[b, t]).sum())
    assert (stats.loss[0, 5:] == 0).all() and not stats.correct[0, 5:].any()  # padding scores nothing
    torch.testing.assert_close(loss, stats.loss.sum() / (labels[:, 1:] != IGNORE_INDEX).sum())
    module.collect_entropy = False
    assert module.step({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})[1].entropy is None


@pytest.mark.parametrize(
    ("name", "millions"), [("llama_100m", (80, 130)), ("llama_500m", (350, 550)), ("llama_1b", (1000, 1400))]
)
def test_paper_sized_model_configs_build_the_advertised_size(name, millions):
    from pathlib import Path

    import yaml

    spec = yaml.safe_load(Path(f"experiments/configs/models/{name}.yaml").read_text())
    init_args = {k: v for k, v in spec["init_args"].items() if k != "optimizer"}
    vocab = {**VOCAB, "vocab_size": 32064}
    with torch.device("meta"):  # shapes only: no memory, no time
        module = CausalLMModule(vocab=vocab, block_size=4096, **init_args)
    params = sum(p.numel() for p in module.parameters()) / 1e6
    assert millions[0] <= params <= millions[1]


TOKENS = ["", "", "", "", ""] + [f"t{i}" for i in range(35)]


def full_logits_reference(module, batch: dict, teacher=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, per-position loss and entropy computed the plain way: logits at every position, then
    cross-entropy with ignore_index (and the KD term on the masked rows of the full logits)."""
    import torch.nn.functional as F

    from lightning_modules.base import predictive_entropy

    logits, labels = module.align(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    labelled = labels != IGNORE_INDEX
    loss = token_loss.sum() / labelled.sum()
    if teacher is not None:
        t = module.distill_temperature
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl = (
            F.kl_div(
                F.log_softmax(logits[labelled] / t, -1),
                F.log_softmax(teacher_logits[labelled] / t, -1),
                log_target=True,
                reduction="sum",
            )
            / labelled.sum()
        )
        loss = loss + module.distill_alpha * t * t * kl
    entropy = predictive_entropy(logits) * labelled
    return loss, token_loss, entropy


def _teacher_dir(tmp_path) -> str:
    torch.manual_seed(1)
    MaskedLMModule(**TINY).model.save_pretrained(tmp_path / "teacher")
    return str(tmp_path / "teacher")


@pytest.mark.parametrize(
    ("module_class", "extra"),
    [
        (CausalLMModule, {}),
        (MaskedLMModule, {"arch": "bert"}),
        (MaskedLMModule, {"arch": "roberta"}),
        (MaskedLMModule, {"arch": "deberta-v2"}),
        (MaskedLMModule, {"arch": "deberta-v2", "config_overrides": {"legacy": False}}),
        (MaskedLMModule, {"nhot": True}),
        (MaskedLMModule, {"distill_from": "teacher"}),
    ],
    ids=["llama", "bert", "roberta", "deberta-v2", "deberta-v2-new-head", "nhot", "kd"],
)
def test_logits_at_labelled_positions_only_give_the_full_computation(module_class, extra, tmp_path):
    if extra.get("distill_from"):
        extra = {**extra, "distill_from": _teacher_dir(tmp_path)}
    torch.manual_seed(0)
    module = module_class(**{**TINY, "vocab": {**VOCAB, "tokens": TOKENS}}, **extra).train()  # train: KD counts
    module.collect_entropy = True
    input_ids, attention_mask = toy_batch()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if module_class is CausalLMModule:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    else:
        labels[0, 2], labels[1, 3], labels[1, 5], labels[1, 6] = 8, 30, 12, 13
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    head_rows = []
    hook = module.model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: head_rows.append(args[0].shape[0])
    )
    loss, stats = module.step(batch)
    hook.remove()
    assert head_rows == [(stats.labels != IGNORE_INDEX).sum().item()]  # the head saw the labelled rows only
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    teacher = module._teacher[0] if extra.get("distill_from") else None
    expected, token_loss, entropy = full_logits_reference(module, batch, teacher)
    expected.backward()

    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats.loss, token_loss)
    torch.testing.assert_close(stats.entropy, entropy)
    assert grads.keys() == {n for n, p in module.named_parameters() if p.grad is not None}
    for name, p in module.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_flop_formula_against_a_hand_count():
    llama = CausalLMModule(**{**TINY, "num_kv_heads": 1, "intermediate_size": 32})
    # per layer: q, o 16x16; k, v 16x8 (one KV head of 8); gate, up, down 16x32; two RMSNorms of 16
    per_layer = 2 * 16 * 16 + 2 * 16 * 8 + 3 * 16 * 32 + 2 * 16
    body = 2 * per_layer + 16  # + the final norm; embeddings excluded
    assert llama.flop_counts.body_params == body == 4688
    expected = 6 * body * 2 * 8 + 12 * 2 * 16 * 2 * 8**2 + 6 * (40 * 16) * 11  # B=2, T=8, head on 11 positions
    assert llama.flop_counts.training_flops(2, 8, 11) == expected

    bert = MaskedLMModule(**TINY)  # intermediate 64
    # per layer: q, k, v, o 16x16 + biases; LayerNorm; 16x64 + 64; 64x16 + 16; LayerNorm
    per_layer = 4 * (16 * 16 + 16) + 2 * 16 + (16 * 64 + 64) + (64 * 16 + 16) + 2 * 16
    assert bert.flop_counts.body_params == 2 * per_layer + 2 * 16  # + the embedding LayerNorm
    assert bert.flop_counts.head_params == 40 * 16 + 16 * 16  # decoder + the MLM head's dense transform


@pytest.mark.parametrize(("module_class", "extra"), [(CausalLMModule, {"num_kv_heads": 2}), (MaskedLMModule, {})])
def test_flop_formula_matches_torchs_flop_counter_on_a_real_step(module_class, extra):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = module_class(
        **{**TINY, "block_size": 64, "hidden_size": 128, "num_heads": 4, "vocab": {**VOCAB, "vocab_size": 500}},
        attn_implementation="eager",
        **extra,
    )  # torch counts no FLOPs in CPU SDPA kernels
    ids = torch.randint(5, 500, (2, 64))
    labels = ids.clone() if module_class is CausalLMModule else torch.where(torch.rand(2, 64) < 0.15, ids, IGNORE_INDEX)
    with FlopCounterMode(display=False) as counter:
        loss, stats = module.step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        loss.backward()
    selected = int((stats.labels != IGNORE_INDEX).sum())
    formula = module.flop_counts.training_flops(2, 64, selected)
    assert formula == pytest.approx(counter.get_total_flops(), rel=0.01)  # norms and biases: <1%
