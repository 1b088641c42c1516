"""The built-in offline corpus: language-like text generated from a seed.

It exists so that everything runs without a network, and it is built so that the questions
masklab asks mean something on it:

* a vocabulary of invented words whose frequencies follow Zipf's law (frequent and rare types,
  as AMLM's per-type difficulty needs);
* sentences from a small grammar with number agreement (a plural subject takes a plural verb),
  closed by ``.``, ``!`` or ``?`` (sentence ends and penultimate tokens exist);
* facts ("The code of Velora is 4812.") stated early in a document and asked for again later
  ("Recall: the code of Velora is 4812."), so long-range retrieval can be trained and measured.
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

    def documents(self, count: int, split: str = "train") -> list[str]:
        """`count` documents; train and validation draw from disjoint random streams."""
        stream = {"train": 0, "validation": 1, "test": 2}[split]
        rng = np.random.default_rng([self.seed, stream])
        return [self.document(rng) for _ in range(count)]
