"""The exported tokenizer frames text as training did: `<s> text` (decoder), `<s> text </s>` (encoder)."""

from __future__ import annotations

from transformers import AutoTokenizer

from datamodules.corpus import BuiltinCorpus
from datamodules.tokenizer import framed_like_training, train_bpe


def test_default_framing_matches_training_and_the_original_is_untouched(tmp_path):
    tokenizer = train_bpe(BuiltinCorpus(0).documents(20), vocab_size=300)
    body = tokenizer("The cat sat.", add_special_tokens=False).input_ids
    other = tokenizer("A dog.", add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for objective, single, pair in (
        ("causal", [bos, *body], [bos, *body, eos, bos, *other]),
        ("mlm", [bos, *body, eos], [bos, *body, eos, bos, *other, eos]),
    ):
        framed_like_training(tokenizer, objective).save_pretrained(tmp_path / objective)
        loaded = AutoTokenizer.from_pretrained(tmp_path / objective)
        assert loaded("The cat sat.").input_ids == single, objective
        assert loaded("The cat sat.", "A dog.").input_ids == pair, objective
        assert loaded("The cat sat.", add_special_tokens=False).input_ids == body  # how training tokenises
    assert tokenizer("The cat sat.").input_ids == body  # the datamodule's own tokenizer keeps no template
