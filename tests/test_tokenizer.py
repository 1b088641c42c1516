"""The exported tokenizer frames text as training did: `<s> text` (decoder), `<s> text </s>` (encoder)."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from datamodules.corpus import BuiltinCorpus
from datamodules.tokenizer import exported_tokenizer, framed_like_training, train_bpe


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


def test_the_exported_tokenizer_pads_where_the_model_needs_and_knows_its_context(tmp_path):
    """Issue 21.14: the export padded on the right with model_max_length 1e30, so batched `generate` on a
    decoder continued pads. A decoder's now pads on the left, an encoder's on the right, and the limit is
    the model's real context (RoBERTa's: its positions less pad_token_id + 1), as saved and reloaded."""
    tokenizer = train_bpe(BuiltinCorpus(0).documents(20), vocab_size=300)
    for objective, model_type, side, context in (("causal", "llama", "left", 130), ("mlm", "roberta", "right", 128)):
        config = AutoConfig.for_model(model_type, max_position_embeddings=130, pad_token_id=1)
        exported_tokenizer(tokenizer, objective, config).save_pretrained(tmp_path / objective)
        loaded = AutoTokenizer.from_pretrained(tmp_path / objective)
        assert (loaded.padding_side, loaded.model_max_length) == (side, context), objective
        batch = loaded(["The cat sat on the mat.", "A dog."], padding=True).input_ids
        assert batch[1][-1 if side == "left" else 0] != loaded.pad_token_id  # the short row's text at that end
    assert (tokenizer.padding_side, tokenizer.model_max_length) != ("left", 130)  # the datamodule's own is untouched
