"""recall: associative-recall accuracy at the query positions of held-out `recall` sequences.

The sequences are those of the run's recall corpus (`data.builtin_variant: recall`, its
`data.recall` options and `data.block_size`), drawn from the test stream no run trains on. A
decoder is scored teacher-forced in one pass: its argmax before each query's value slot must be
the value bound to the query's key. An encoder gets every value slot of the queries as [MASK] and
must fill each. Accuracy is split by the query's distance to its pair (power-of-two buckets) and
by whether it is the first query of its key (a repeat can also copy the earlier query's answer).
`chance` is 1/pairs, what answering with a random value of the context scores on every accuracy here:
the plateau a model sits on before it learns to look a key up (a constant answer scores ~1/values).
The heatmap is the needle view: accuracy by sequence length x the asked pair's position; lengths
beyond `block_size` put the extra filler between the pairs and the queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from core.errors import ConfigError
from datamodules.recall import RecallConfig, RecallSequences, generate, is_recall_vocabulary
from evaluation.heatmap import heatmap
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult


@dataclass
class Options:
    """Which held-out sequences are scored.

    Args:
        sequences: held-out sequences per length, each holding `data.recall.queries` answers.
        lengths: sequence lengths of the heatmap; None = the run's block_size and up to 3 longer ones
            spread to the model's context.
        seed: seed of the held-out sequences; None = the run's data seed (its test stream is never trained on).
        batch_size: sequences per forward pass.
    """

    sequences: int = 256
    lengths: list[int] | None = None
    seed: int | None = None
    batch_size: int = 64


# (ids [B, L], value positions [B, Q]) -> predicted token at each value position [B, Q]; tests plug in oracles
Predictor = Callable[[Tensor, Tensor], Tensor]


def run_recall_config(loaded: LoadedModel) -> tuple[RecallConfig, int, int]:
    """The run's recall options, sequence length and data seed; refused for a model of another corpus.
    A pre-training run's sequences are its block_size long; a fine-tuning run's samples have no filler."""
    section = loaded.run_config.get("data", {})
    data = section.get("init_args", section)
    if data.get("builtin_variant") != "recall":
        raise ConfigError(
            "recall: the model was not trained on the recall corpus "
            f"(data.builtin_variant is {data.get('builtin_variant')!r}); the suite scores only recall runs"
        )
    config = RecallConfig(**(data.get("recall") or {}))
    if not is_recall_vocabulary(loaded.tokenizer, config):
        raise ConfigError("recall: the model's tokenizer is not the vocabulary of its run's data.recall options")
    fine_tuned = str(section.get("class_path", "")).endswith("FineTuneDataModule")
    return config, config.min_length if fine_tuned else int(data["block_size"]), int(data.get("seed", 0))


def model_predictor(loaded: LoadedModel, batch_size: int) -> Predictor:
    """A decoder's argmax one position before each value; an encoder's at the value slot, every slot masked."""

    @torch.no_grad()
    def predict(ids: Tensor, value_position: Tensor) -> Tensor:
        out = torch.empty_like(value_position)
        for start in range(0, len(ids), batch_size):
            rows, slots = ids[start : start + batch_size], value_position[start : start + batch_size]
            if loaded.objective == "causal":
                slots = slots - 1
            else:
                rows = rows.scatter(1, slots, loaded.vocab.mask_id)
            logits = loaded.model(input_ids=rows.to(loaded.device)).logits  # [B, L, V]
            index = slots.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1])
            out[start : start + batch_size] = logits.gather(1, index).argmax(-1).cpu()
        return out

    return predict


def score(sequences: RecallSequences, predict: Predictor) -> np.ndarray:
    """[N, Q] bool: each query answered with the value bound to its key."""
    predicted = predict(torch.from_numpy(sequences.ids), torch.from_numpy(sequences.value_position))
    return predicted.numpy() == sequences.answer


def distance_buckets(distance: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Accuracy by power-of-two distance bucket (`1_1`, `2_3`, `4_7`, ...), buckets with queries only."""
    bucket = np.floor(np.log2(distance)).astype(int)
    return {f"{2**b}_{2 ** (b + 1) - 1}": float(correct[bucket == b].mean()) for b in np.unique(bucket)}


def heatmap_lengths(loaded: LoadedModel, options: Options, block_size: int) -> list[int]:
    context = loaded.context_length
    lengths = options.lengths or sorted({block_size, *np.linspace(block_size, context, 4).round().astype(int).tolist()})
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ConfigError(f"recall.lengths {too_long} exceed the model's context of {context} tokens")
    return sorted(lengths)


def length_config(config: RecallConfig, block_size: int, length: int) -> RecallConfig:
    """The run's options at another length: the difference in filler between the pairs and the queries."""
    if length == block_size:
        return config
    filler = "uniform" if config.filler == "none" else config.filler
    return replace(config, filler=filler, distance=max(0, config.distance + length - block_size))


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes (`<b>`: a distance bucket such as 4_7, `<n>`: a sequence length), so a study
    can check its metric names before training."""
    return ["acc", "acc_first", "acc_repeat", "acc_distance_<b>", "acc_length_<n>", "chance"]


def run(loaded: LoadedModel, options: Options, predict: Predictor | None = None) -> SuiteResult:
    if options.sequences < 1:
        raise ConfigError(f"recall.sequences must be >= 1, got {options.sequences}")
    config, block_size, data_seed = run_recall_config(loaded)
    seed = data_seed if options.seed is None else options.seed
    predict = predict or model_predictor(loaded, options.batch_size)
    main_sequences = generate(config, block_size, options.sequences, seed, "test", loaded.vocab.bos_id)
    main = score(main_sequences, predict)
    lengths = heatmap_lengths(loaded, options, block_size)
    grid = np.zeros((config.pairs, len(lengths)))
    by_length: dict[int, float] = {}
    for column, length in enumerate(lengths):
        at_length = length_config(config, block_size, length)
        errors = at_length.errors(length, prefix="recall")
        if errors:
            raise ConfigError([f"recall.lengths={length}: {e}" for e in errors])
        sequences = (
            main_sequences
            if length == block_size
            else generate(at_length, length, options.sequences, seed, "test", loaded.vocab.bos_id)
        )
        correct = main if length == block_size else score(sequences, predict)
        asked = np.bincount(sequences.pair.ravel(), minlength=config.pairs)
        grid[:, column] = np.bincount(sequences.pair.ravel(), correct.ravel(), config.pairs) / np.maximum(asked, 1)
        by_length[length] = float(correct.mean())
    first = main_sequences.first
    metrics = {
        "acc": float(main.mean()),
        "acc_first": float(main[first].mean()) if first.any() else float("nan"),
        "acc_repeat": float(main[~first].mean()) if (~first).any() else float("nan"),
    }
    distances = distance_buckets(main_sequences.distance, main)
    metrics |= {f"acc_distance_{bucket}": value for bucket, value in distances.items()}
    metrics |= {f"acc_length_{n}": value for n, value in by_length.items()}
    metrics["chance"] = 1 / config.pairs  # depends on the run's data, so the suite writes it beside the accuracies
    table = "\n".join(
        [
            f"accuracy {metrics['acc']:.3f} over {main.size} queries of {options.sequences} held-out sequences "
            f"({block_size} tokens, {config.pairs} pairs, {config.queries} queries, filler {config.filler}); "
            f"first query of a key {metrics['acc_first']:.3f}, repeat {metrics['acc_repeat']:.3f}",
            "",
            "| distance to the pair | " + " | ".join(b.replace("_", "–") for b in distances) + " |",
            "| --- " * (len(distances) + 1) + "|",
            "| accuracy | " + " | ".join(f"{v:.2f}" for v in distances.values()) + " |",
        ]
    )
    details = {"lengths": lengths, "accuracy_by_pair_and_length": grid.tolist(), "accuracy_by_distance": distances}
    pairs = [str(p + 1) for p in range(grid.shape[0])]
    figure = heatmap(
        grid, pairs, lengths, f"recall: accuracy {metrics['acc']:.2f}", "position of the asked pair", "accuracy"
    )
    return SuiteResult(metrics, {"heatmap": figure}, table, details)
