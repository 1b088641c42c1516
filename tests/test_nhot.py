import torch
from torch import nn
from transformers import AutoModelForMaskedLM

from lightning_modules.nhot import NHotEmbedding, substring_lists


def test_substring_sets_of_hand_picked_tokens():
    tokens = ["", "Ġthe", "the", "th", "e", "Ġthere", "re", "x"]
    lists = substring_lists(tokens)
    assert lists[5] == [1, 2, 3, 4, 6]  # "there" contains the, the, th, e, re (marker stripped)
    assert lists[1] == [2, 3, 4] and lists[2] == [1, 3, 4]  # "Ġthe" and "the" contain each other
    assert lists[3] == [] and lists[7] == [] and lists[0] == []  # single letters / specials: none


def test_embedding_is_token_plus_mean_of_substrings():
    tokens = ["", "ab", "a", "b", "abc"]
    base = nn.Embedding(5, 3)
    embedding = NHotEmbedding(base, tokens)
    ids = torch.tensor([[4, 1, 2]])
    out = embedding(ids)
    p = embedding.substrings.weight
    torch.testing.assert_close(out[0, 0], base.weight[4] + (p[1] + p[2] + p[3]) / 3)  # abc ⊃ ab, a, b
    torch.testing.assert_close(out[0, 1], base.weight[1] + (p[2] + p[3]) / 2)
    torch.testing.assert_close(out[0, 2], base.weight[2])  # no substrings: the plain embedding
    out.sum().backward()
    assert p.grad is not None and p.grad[1].abs().sum() > 0


def test_nhot_run_exports_a_plain_model_with_the_same_logits(tiny_args, tmp_path):
    from experiments.run import main

    cli = main(["--config", "experiments/configs/amlm_nhot.yaml", *tiny_args])
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "runs" / "amlm_nhot" / "version_0" / "hf_model").eval()
    assert type(model.get_input_embeddings()) is nn.Embedding
    ids = torch.randint(7, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cli.model.eval()(ids))
