"""The built-in offline fine-tuning data: long-context QA and key–value retrieval.

It exists so that fine-tuning (and the MEAP fine-tuning study) runs without a network, and it is
built so that MEAP's fine-tuning rule means something on it:

* **key–value retrieval** (`kind="kv"`): a context of facts ("The code of Velora is 4812.") with
  filler sentences between them, and a question about one key; the answer is the value — a few
  tokens, always under MEAP's 50-token threshold. The gold fact's place in the context is
  recorded (`gold_position`, 0 = first fact, 1 = last), so retrieval can be scored by position.
* **long-context QA** (`kind="record"`): a context of several records, each a run of facts about
  one name, and a request to recite one record; the answer is that record, 2 to 12 facts long, so
  answers fall both under and over 50 tokens.

Names, attributes and filler sentences come from the pre-training corpus (`BuiltinCorpus`) of the
same seed, so a tokenizer trained on it covers this text well. Train, validation and test draw
from disjoint random streams, as the pre-training corpus does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.corpus import ATTRIBUTES, BuiltinCorpus

RECORD_ATTRIBUTES = [*ATTRIBUTES, "gate", "level", "batch", "track", "shelf", "seat"]
SPLITS = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class QAExample:
    prompt: str
    answer: str
    kind: str  # "kv" (short answer) or "record" (answer of 2-12 facts)
    gold_position: float  # where the needed fact sits among the context's facts: 0 = first, 1 = last


class QACorpus:
    """Deterministic generator of QA examples; the same seed gives the same examples.

    Args:
        seed: seed of the world (names, words) and of the examples.
        max_facts: most facts in a key–value context (at least 2); record contexts hold
            2 to max(2, max_facts // 5) records.
        record_facts: (fewest, most) facts in one record, i.e. in a long-context answer.
    """

    def __init__(self, seed: int = 0, max_facts: int = 16, record_facts: tuple[int, int] = (2, 12)) -> None:
        if max_facts < 2:
            raise ValueError(f"max_facts must be >= 2, got {max_facts}")
        if not 1 <= record_facts[0] <= record_facts[1] <= len(RECORD_ATTRIBUTES):
            raise ValueError(
                f"record_facts must satisfy 1 <= low <= high <= {len(RECORD_ATTRIBUTES)}, got {record_facts}"
            )
        self.world = BuiltinCorpus(seed)
        self.seed = seed
        self.max_facts = max_facts
        self.record_facts = record_facts

    def kv_example(self, rng: np.random.Generator) -> QAExample:
        count = int(rng.integers(2, self.max_facts + 1))
        names = rng.choice(self.world.names, size=count, replace=False)
        attribute = str(rng.choice(ATTRIBUTES))
        values = rng.integers(1000, 10000, size=count)
        gold = int(rng.integers(count))
        sentences = []
        for name, value in zip(names, values):
            sentences += [self.world.sentence(rng) for _ in range(rng.integers(0, 2))]
            sentences.append(f"The {attribute} of {name} is {value}.")
        prompt = f"{' '.join(sentences)}\nQuestion: what is the {attribute} of {names[gold]}?"
        return QAExample(prompt, f"{values[gold]}", "kv", gold / (count - 1))

    def record_example(self, rng: np.random.Generator) -> QAExample:
        count = int(rng.integers(2, max(2, self.max_facts // 5) + 1))
        names = rng.choice(self.world.names, size=count, replace=False)
        records = []
        for name in names:
            size = int(rng.integers(self.record_facts[0], self.record_facts[1] + 1))
            attributes = rng.choice(RECORD_ATTRIBUTES, size=size, replace=False)
            records.append(" ".join(f"The {a} of {name} is {rng.integers(1000, 10000)}." for a in attributes))
        gold = int(rng.integers(count))
        prompt = f"{' '.join(records)}\nQuestion: recite everything about {names[gold]}."
        return QAExample(prompt, records[gold], "record", gold / (count - 1))

    def examples(self, count: int, split: str = "train") -> list[QAExample]:
        """`count` examples, alternating key–value retrieval and long-context QA."""
        rng = np.random.default_rng([self.seed, 1000 + SPLITS[split]])
        return [self.kv_example(rng) if i % 2 == 0 else self.record_example(rng) for i in range(count)]
