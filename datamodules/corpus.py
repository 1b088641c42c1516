"""The built-in offline corpus: language-like text generated from a seed.

It exists so that everything runs without a network, and it is built so that the questions
masklab asks mean something on it:

* a vocabulary of invented words whose frequencies follow Zipf's law (frequent and rare types,
  as AMLM's per-type difficulty needs);
* sentences from a small grammar with number agreement (a plural subject takes a plural verb),
  closed by ``.``, ``!`` or ``?`` (sentence ends and penultimate tokens exist);
* facts ("The code of Velora is 4812.") stated early in a document and asked for again later
  ("Recall: the code of Velora is 4812."), so long-range retrieval can be trained and measured.

The `retrieval_dense` variant trades language for retrieval: short documents made mostly of key-value
facts, each recalled a controlled number of sentences after it is stated, and, in equal shares, the two
prompt forms of the retrieval suite (JSON records, numbered documents) followed by their answer. It was
built so that a model small enough to train on a CPU would learn to retrieve early; measured, a 64-wide
2-layer decoder still retrieves nothing after 3M tokens of it (experiments/configs/studies/meap_vs_ntp.yaml
gives the calibration), so retrieval questions need larger models than a CPU trains.
"""

from __future__ import annotations

import numpy as np

FUNCTION_WORDS = {
    "det": ["the", "a", "every", "this", "that", "some"],
    "prep": ["in", "on", "near", "with", "under", "behind", "beyond", "across"],
    "conj": ["and", "but", "because", "while", "so"],
    "adv": ["often", "never", "quietly", "slowly", "always", "rarely"],
}
ATTRIBUTES = ["code", "number", "key", "year", "port", "room"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "gr", "pl", "tr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "l", "m", "sk", "nd", "t"]


def _invent_words(rng: np.random.Generator, count: int, syllables: tuple[int, int]) -> list[str]:
    words: set[str] = set()
    while len(words) < count:
        n = rng.integers(syllables[0], syllables[1] + 1)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        words.add(word)
    return sorted(words)


def _zipf_weights(count: int, exponent: float = 1.1) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return weights / weights.sum()


class BuiltinCorpus:
    """Deterministic generator of documents; the same seed gives the same text."""

    def __init__(self, seed: int = 0, nouns: int = 600, verbs: int = 200, adjectives: int = 200, names: int = 300):
        rng = np.random.default_rng(seed)
        self.nouns = _invent_words(rng, nouns, (1, 2))
        self.verbs = _invent_words(rng, verbs, (1, 2))
        self.adjectives = _invent_words(rng, adjectives, (2, 3))
        self.names = [w.capitalize() for w in _invent_words(rng, names, (2, 3))]
        self._noun_p = _zipf_weights(len(self.nouns))
        self._verb_p = _zipf_weights(len(self.verbs))
        self._adj_p = _zipf_weights(len(self.adjectives))
        self.seed = seed

    def _pick(self, rng: np.random.Generator, words: list[str], p: np.ndarray) -> str:
        return words[rng.choice(len(words), p=p)]

    def _noun_phrase(self, rng: np.random.Generator, plural: bool) -> str:
        det = "the" if plural else rng.choice(FUNCTION_WORDS["det"])
        adj = f"{self._pick(rng, self.adjectives, self._adj_p)} " if rng.random() < 0.4 else ""
        noun = self._pick(rng, self.nouns, self._noun_p) + ("s" if plural else "")
        return f"{det} {adj}{noun}"

    def sentence(self, rng: np.random.Generator) -> str:
        plural = rng.random() < 0.4
        subject = self._noun_phrase(rng, plural)
        verb = self._pick(rng, self.verbs, self._verb_p) + ("" if plural else "s")
        words = [subject, verb, self._noun_phrase(rng, rng.random() < 0.4)]
        if rng.random() < 0.3:
            words.insert(1, rng.choice(FUNCTION_WORDS["adv"]))
        if rng.random() < 0.35:
            words.append(f"{rng.choice(FUNCTION_WORDS['prep'])} {self._noun_phrase(rng, False)}")
        if rng.random() < 0.2:
            clause = f"{self._noun_phrase(rng, False)} {self._pick(rng, self.verbs, self._verb_p)}s"
            words.append(f", {rng.choice(FUNCTION_WORDS['conj'])} {clause}")
        text = " ".join(words).replace(" ,", ",")
        punct = rng.choice([".", ".", ".", ".", "!", "?"])
        return text[0].upper() + text[1:] + punct

    def document(self, rng: np.random.Generator, sentences: tuple[int, int] = (6, 30)) -> str:
        body = [self.sentence(rng) for _ in range(rng.integers(*sentences))]
        facts = []
        for _ in range(rng.integers(1, 4)):
            name, attribute = rng.choice(self.names), rng.choice(ATTRIBUTES)
            value = int(rng.integers(1000, 10000))
            facts.append((name, attribute, value))
            body.insert(int(rng.integers(0, len(body) // 2 + 1)), f"The {attribute} of {name} is {value}.")
        for name, attribute, value in facts:
            body.insert(
                int(rng.integers(len(body) // 2, len(body) + 1)), f"Recall: the {attribute} of {name} is {value}."
            )
        paragraphs = [" ".join(body[i : i + 5]) for i in range(0, len(body), 5)]
        return "\n".join(paragraphs)

    def _fact(self, rng: np.random.Generator, names: list[str], attribute: str | None = None) -> tuple[str, str, int]:
        name = str(rng.choice(self.names))
        while name in names:
            name = str(rng.choice(self.names))
        names.append(name)
        return name, attribute or str(rng.choice(ATTRIBUTES)), int(rng.integers(1000, 10000))

    def recall_document(self, rng: np.random.Generator, facts: tuple[int, int] = (3, 8), distance: int = 8) -> str:
        """Facts among filler sentences; each is recalled once, after the first fact that comes at
        least d sentences later (d uniform in 1..`distance`), or at the document's end."""
        names: list[str] = []
        sentences: list[str] = []
        due: list[tuple[int, str]] = []  # (sentence count from which the recall may come, recall)
        for _ in range(rng.integers(facts[0], facts[1] + 1)):
            if rng.random() < 0.5:
                sentences.append(self.sentence(rng))
            name, attribute, value = self._fact(rng, names)
            sentences.append(f"The {attribute} of {name} is {value}.")
            now = len(sentences)
            ready = [recall for at, recall in due if at <= now]
            due = [(at, recall) for at, recall in due if at > now]
            due.append((now + int(rng.integers(1, distance + 1)), f"Recall: the {attribute} of {name} is {value}."))
            sentences += ready
        return " ".join(sentences + [recall for _, recall in due])

    def kv_document(self, rng: np.random.Generator, records: tuple[int, int] = (2, 8)) -> str:
        """JSON records and a question about one key, in the retrieval suite's form, with its answer."""
        names: list[str] = []
        pairs = [self._fact(rng, names)[::2] for _ in range(rng.integers(records[0], records[1] + 1))]
        key, value = pairs[rng.integers(len(pairs))]
        data = ", ".join(f'"{name}": "{number}"' for name, number in pairs)
        return f'JSON data: {{{data}}}\nQuestion: what is the value of "{key}"?\nAnswer: {value}'

    def qa_document(self, rng: np.random.Generator, documents: tuple[int, int] = (2, 4)) -> str:
        """Numbered documents, each stating one fact, and a question, in the retrieval suite's form."""
        names: list[str] = []
        attribute = str(rng.choice(ATTRIBUTES))
        facts = [self._fact(rng, names, attribute) for _ in range(rng.integers(documents[0], documents[1] + 1))]
        body = "\n".join(
            f"Document [{i + 1}] {self.sentence(rng)} The {attribute} of {name} is {value}. {self.sentence(rng)}"
            for i, (name, _, value) in enumerate(facts)
        )
        name, _, value = facts[rng.integers(len(facts))]
        return f"{body}\nQuestion: what is the {attribute} of {name}?\nAnswer: {value}"

    def retrieval_dense_document(self, rng: np.random.Generator) -> str:
        kind = rng.integers(3)
        return (self.recall_document, self.kv_document, self.qa_document)[kind](rng)

    def documents(self, count: int, split: str = "train", variant: str = "default") -> list[str]:
        """`count` documents of `variant` (see VARIANTS); train and validation draw from disjoint random streams."""
        if variant not in VARIANTS:
            raise ValueError(f"data.builtin_variant: unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
        stream = {"train": 0, "validation": 1, "test": 2}[split]
        rng = np.random.default_rng([self.seed, stream])
        make = getattr(self, VARIANTS[variant])
        return [make(rng) for _ in range(count)]


VARIANTS = {"default": "document", "retrieval_dense": "retrieval_dense_document"}
