"""How the suites ask a model for numbers: log-probabilities, pseudo-log-likelihoods, answers.

Everything here is batched on the model's device: sequences are padded into one tensor, and a
pseudo-log-likelihood masks every position of every sentence at once as rows of a large batch
(Salazar et al. 2020), never one token at a time in Python.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.model import LoadedModel
from lightning_modules.masked_lm import mlm_head


def pad(sequences: list[list[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """[N, L] ids and [N, L] attention mask; padding on the right (or left, for generation)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(longest - len(seq), longest) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        attention[row, span] = 1
    return ids, attention


def _chunks_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def causal_logprobs(
    loaded: LoadedModel, sequences: list[list[int]], batch_size: int = 32, scored_from: list[int] | None = None
) -> Tensor:
    """[N] float: log p(s[k:] | s[:k]) summed over tokens, for a causal model; k = scored_from[i]
    (default 1: everything after the BOS)."""
    totals = torch.zeros(len(sequences))
    first = torch.tensor(scored_from) if scored_from is not None else torch.ones(len(sequences), dtype=torch.long)
    for chunk in _chunks_by_length([len(s) for s in sequences], batch_size):
        ids, attention = pad([sequences[i] for i in chunk], loaded.vocab.pad_id)  # [B, L]
        scored = attention[:, 1:].bool() & (
            torch.arange(1, ids.shape[1]) >= first[chunk][:, None]
        )  # [B, L-1]: token t+1
        ids = ids.to(loaded.device)
        logits = (
            loaded.model(input_ids=ids, attention_mask=attention.to(loaded.device)).logits[:, :-1].float()
        )  # [B, L-1, V]
        token_logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()  # [B, L-1]
        totals[chunk] = (token_logp * scored).sum(1)
    return totals


@torch.no_grad()
def answer_logprobs(
    loaded: LoadedModel, prompts: list[list[int]], targets: list[list[int]], batch_size: int = 16
) -> Tensor:
    """[N] float: log-probability of each target answer after its prompt, teacher-forced: a
    decoder's log p(answer | prompt); an encoder's sum of log p(answer token i | prompt, [MASK] slots),
    the slots appended as `answers` does. Graded where exact match is all-or-nothing."""
    if loaded.objective == "causal":
        return causal_logprobs(loaded, [p + t for p, t in zip(prompts, targets)], batch_size, [len(p) for p in prompts])
    vocab = loaded.vocab
    totals = torch.zeros(len(prompts))
    for chunk in _chunks_by_length([len(p) + len(t) for p, t in zip(prompts, targets)], batch_size):
        slots = [[*prompts[i], *([vocab.mask_id] * len(targets[i])), vocab.eos_id] for i in chunk]
        ids, attention = pad(slots, vocab.pad_id)
        row_of = torch.tensor([row for row, i in enumerate(chunk) for _ in targets[i]])  # [M]: one per answer token
        column = torch.tensor([len(prompts[i]) + j for i in chunk for j in range(len(targets[i]))])  # [M]
        token = torch.tensor([t for i in chunk for t in targets[i]])  # [M]
        logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=attention.to(loaded.device)).logits
        log_probs = torch.log_softmax(
            logits[row_of.to(logits.device), column.to(logits.device)].float(), -1
        ).cpu()  # [M, V]
        picked = log_probs.gather(-1, token[:, None]).squeeze(-1)  # [M]
        totals[chunk] = torch.zeros(len(chunk)).index_add_(0, row_of, picked)
    return totals


@torch.no_grad()
def masked_token_logprobs(
    loaded: LoadedModel, sequences: list[list[int]], scored: list[list[bool]], rows_per_batch: int = 256
) -> tuple[Tensor, Tensor]:
    """Each scored token, masked alone: log p(x_t | x without t) for a masked LM.

    Returns ([R] log-probabilities, [R] index of the sequence each belongs to), rows ordered by
    sequence length. Every scored position of every sequence is one row of a batch of up to
    `rows_per_batch` rows of one length: no padding, so no attention mask, and the output head
    runs on the masked position of each row only.
    """
    ids, attention = pad(sequences, loaded.vocab.pad_id)  # [N, L]
    score = torch.zeros_like(ids, dtype=torch.bool)
    for row, flags in enumerate(scored):
        score[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    sequence_of, position = score.nonzero(as_tuple=True)  # [R], [R]
    row_length = attention.sum(1)[sequence_of]  # [R]
    by_length = torch.argsort(row_length, stable=True)
    sequence_of, position, row_length = sequence_of[by_length], position[by_length], row_length[by_length]
    head = mlm_head(loaded.model)
    out = torch.empty(len(sequence_of))
    start = 0
    for width, count in zip(*(t.tolist() for t in torch.unique_consecutive(row_length, return_counts=True))):
        for chunk in range(start, start + count, rows_per_batch):
            stop = min(chunk + rows_per_batch, start + count)
            seq, pos = sequence_of[chunk:stop], position[chunk:stop]
            rows = ids[seq, :width].clone()  # [r, width]
            arange = torch.arange(len(seq))
            targets = rows[arange, pos].clone()  # [r]
            rows[arange, pos] = loaded.vocab.mask_id
            hidden = loaded.model.base_model(input_ids=rows.to(loaded.device)).last_hidden_state  # [r, width, H]
            logits = head(hidden[arange.to(hidden.device), pos.to(hidden.device)]).float()  # [r, V]
            out[chunk:stop] = (
                torch.log_softmax(logits, -1).gather(-1, targets[:, None].to(logits.device)).squeeze(-1).cpu()
            )
        start += count
    return out, sequence_of


def pseudo_log_likelihoods(loaded: LoadedModel, sequences: list[list[int]], rows_per_batch: int = 256) -> Tensor:
    """[N] float: sum over a sequence's regular tokens of log p(token | all the others)."""
    scored = [(~loaded.vocab.is_special[torch.tensor(s)]).tolist() for s in sequences]
    logp, sequence_of = masked_token_logprobs(loaded, sequences, scored, rows_per_batch)
    return torch.zeros(len(sequences)).index_add_(0, sequence_of, logp)


def sentence_scores(loaded: LoadedModel, sentences: list[str], batch_size: int = 32) -> Tensor:
    """[N] float: log-probability (causal) or pseudo-log-likelihood (masked) of each sentence,
    encoded as `<bos> sentence` for a decoder and `<bos> sentence <eos>` for an encoder."""
    encoded = loaded.tokenizer(sentences, add_special_tokens=False)["input_ids"]
    bos, eos = loaded.vocab.bos_id, loaded.vocab.eos_id
    if loaded.objective == "causal":
        return causal_logprobs(loaded, [[bos, *ids] for ids in encoded], batch_size)
    return pseudo_log_likelihoods(loaded, [[bos, *ids, eos] for ids in encoded], rows_per_batch=8 * batch_size)


# (prompts, new tokens) -> answer texts: `answers` on a model; tests plug in oracles
Answerer = Callable[[list[list[int]], int], list[str]]


@torch.no_grad()
def answers(
    loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, batch_size: int = 16, use_cache: bool = True
) -> list[str]:
    """The model's answer to each prompt (token ids), decoded up to the first EOS / newline.

    A decoder continues the prompt greedily with transformers' `generate` (prompts left-padded);
    an encoder fills `new_tokens` [MASK] slots appended to the prompt in one pass.
    """
    vocab = loaded.vocab
    generated: list[list[int]] = [[] for _ in prompts]
    for chunk in _chunks_by_length([len(p) for p in prompts], batch_size):
        if loaded.objective == "causal":
            ids, attention = pad([prompts[i] for i in chunk], vocab.pad_id, left=True)
            output = loaded.model.generate(
                input_ids=ids.to(loaded.device),
                attention_mask=attention.to(loaded.device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=vocab.pad_id,
            )[:, ids.shape[1] :]  # [B, new_tokens]
        else:
            slots = [[*prompts[i], *([vocab.mask_id] * new_tokens), vocab.eos_id] for i in chunk]
            ids, attention = pad(slots, vocab.pad_id)
            logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=attention.to(loaded.device)).logits
            starts = torch.tensor([len(prompts[i]) for i in chunk])
            columns = starts[:, None] + torch.arange(new_tokens)  # [B, new_tokens]
            output = logits.argmax(-1).cpu().gather(1, columns)
        for row, i in enumerate(chunk):
            generated[i] = output[row].tolist()
    texts = []
    for tokens in generated:
        if vocab.eos_id in tokens:
            tokens = tokens[: tokens.index(vocab.eos_id)]
        texts.append(loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip().split("\n")[0])
    return texts


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's rule)."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def exact_match(prediction: str, answer: str) -> bool:
    """The prediction starts with the answer, word for word, after normalisation."""
    words, gold = normalize(prediction).split(), normalize(answer).split()
    return bool(gold) and words[: len(gold)] == gold


def contains_answer(prediction: str, answers: list[str]) -> bool:
    """Any normalised answer occurs in the normalised prediction (lost-in-the-middle's metric)."""
    padded = f" {normalize(prediction)} "
    return any(f" {normalize(a)} " in padded for a in answers if normalize(a))


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """[B, L] cross-entropy of each target under its logits, 0 where the target is -100."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)
