"""Perplexity and pseudo-perplexity against the formula computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import DataError
from evaluation import perplexity
from evaluation.heldout import heldout_blocks, heldout_texts
from evaluation.model import load_model


def test_decoder_perplexity_is_exp_of_the_mean_next_token_loss(tiny_causal_dir):
    loaded = load_model(str(tiny_causal_dir))
    options = perplexity.Options(block_size=32, max_blocks=3, batch_size=2, documents=20)
    result = perplexity.run(loaded, options)
    blocks = heldout_blocks(heldout_texts(None, 0, 20), loaded, 32, 3)
    with torch.no_grad():
        logits = loaded.model(input_ids=blocks).logits[:, :-1]
    by_hand = math.exp(F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item())
    assert result.metrics["ppl"] == pytest.approx(by_hand, rel=1e-4)
    assert result.details["scored_tokens"] == 3 * 31


def test_encoder_pseudo_perplexity_masks_each_regular_token_alone(tiny_mlm_dir):
    loaded = load_model(str(tiny_mlm_dir))
    result = perplexity.run(loaded, perplexity.Options(block_size=8, max_blocks=1, documents=5))
    block = heldout_blocks(heldout_texts(None, 0, 5), loaded, 8, 1)[0]
    logps = []
    with torch.no_grad():
        for t in range(8):
            if loaded.vocab.is_special[block[t]]:
                continue
            ids = block.clone()[None]
            ids[0, t] = loaded.vocab.mask_id
            logps.append(torch.log_softmax(loaded.model(input_ids=ids).logits[0, t], -1)[block[t]].item())
    assert result.metrics["pseudo_ppl"] == pytest.approx(math.exp(-sum(logps) / len(logps)), rel=1e-4)
    assert result.details["scored_tokens"] == len(logps)


def test_a_block_longer_than_the_context_is_refused(tiny_causal_dir):
    with pytest.raises(DataError, match="ppl.block_size=512 is longer than the model's context of 256"):
        perplexity.run(load_model(str(tiny_causal_dir)), perplexity.Options(block_size=512))
