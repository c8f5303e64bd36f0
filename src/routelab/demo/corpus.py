"""Deterministic synthetic corpus for the built-in demo: domains that need different skills.

- ``arithmetic``: equations whose right-hand side follows from the left (``17 + 25 = 42 .``).
- ``grammar``: sentences from a small probabilistic English grammar.
- ``code``: code-like lines with nested, balanced brackets.
- ``cloze``: LAMBADA-style passages whose last word (an object) is named earlier in the passage
  and cannot be guessed from the last sentence alone.

Every document is a pure function of ``(seed, domain, split, index)``, so any subset can be
regenerated exactly and the train / eval / calibration splits never share a random stream.
"""

from __future__ import annotations

import numpy as np

DOMAINS = ("arithmetic", "grammar", "code", "cloze")
SPLITS = ("train", "eval", "calibration")

NAMES = ["anna", "ben", "carla", "dev", "elif", "farid", "greta", "hugo", "ines", "jonas", "kira", "leo",
         "mira", "nils", "olga", "pavel", "rosa", "sami", "tara", "umar"]
OBJECTS = ["lamp", "kettle", "violin", "compass", "basket", "ladder", "blanket", "candle", "helmet", "mirror",
           "anchor", "bucket", "camera", "drum", "feather", "globe", "hammer", "jacket", "kite", "lantern",
           "magnet", "needle", "oar", "pillow", "quilt", "rope", "saddle", "telescope", "umbrella", "vase",
           "wagon", "whistle", "barrel", "bottle", "carpet", "chisel", "flute", "harp", "scarf", "shovel"]
PLACES = ["attic", "garden", "kitchen", "harbor", "market", "station", "library", "barn", "forest", "bridge"]
ADJECTIVES = ["small", "old", "red", "quiet", "heavy", "bright", "strange", "tired", "green", "happy"]
NOUNS = ["dog", "cat", "farmer", "teacher", "bird", "child", "sailor", "baker", "horse", "river"]
VERBS_T = ["sees", "follows", "finds", "helps", "watches", "paints", "calls", "visits"]
VERBS_I = ["sleeps", "sings", "waits", "runs", "laughs", "stays"]
PREPOSITIONS = ["near", "under", "behind", "beside", "above"]
IDENTIFIERS = ["x", "y", "n", "acc", "item", "val", "idx", "buf", "key", "node"]
FUNCTIONS = ["f", "g", "step", "merge", "walk", "load", "emit", "fold"]
BRACKETS = [("(", ")"), ("[", "]"), ("{", "}")]


def _rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAINS.index(domain), SPLITS.index(split), index])


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _arithmetic(rng: np.random.Generator) -> str:
    lines = []
    for _ in range(int(rng.integers(6, 14))):
        op = _pick(rng, ["+", "-", "*"])
        a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50 if op != "*" else 12))
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(f"{a} {op} {b} = {result} .")
    return " ".join(lines)


def _noun_phrase(rng: np.random.Generator) -> str:
    words = [_pick(rng, ["the", "a"])]
    if rng.random() < 0.5:
        words.append(_pick(rng, ADJECTIVES))
    words.append(_pick(rng, NOUNS))
    if rng.random() < 0.25:
        words += [_pick(rng, PREPOSITIONS), "the", _pick(rng, PLACES)]
    return " ".join(words)


def _sentence(rng: np.random.Generator) -> str:
    if rng.random() < 0.6:
        return f"{_noun_phrase(rng)} {_pick(rng, VERBS_T)} {_noun_phrase(rng)} ."
    return f"{_noun_phrase(rng)} {_pick(rng, VERBS_I)} {_pick(rng, PREPOSITIONS)} the {_pick(rng, PLACES)} ."


def _grammar(rng: np.random.Generator) -> str:
    return " ".join(_sentence(rng) for _ in range(int(rng.integers(4, 9))))


def _expression(rng: np.random.Generator, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return _pick(rng, IDENTIFIERS) if rng.random() < 0.7 else str(int(rng.integers(0, 10)))
    open_, close = BRACKETS[int(rng.integers(3))]
    parts = [_expression(rng, depth - 1) for _ in range(int(rng.integers(1, 3)))]
    return f"{open_} {' , '.join(parts)} {close}"


def _code(rng: np.random.Generator) -> str:
    lines = []
    for _ in range(int(rng.integers(3, 7))):
        args = " , ".join(_pick(rng, IDENTIFIERS) for _ in range(int(rng.integers(1, 3))))
        lines.append(f"def {_pick(rng, FUNCTIONS)} ( {args} ) : return {_expression(rng, 3)} ;")
    return " ".join(lines)


def _cloze(rng: np.random.Generator) -> str:
    owner, friend = (str(n) for n in rng.choice(NAMES, size=2, replace=False))
    thing, place = _pick(rng, OBJECTS), _pick(rng, PLACES)
    fillers = [_sentence(rng) for _ in range(int(rng.integers(1, 3)))]
    # The object is named twice before the end, so copying it is learnable by a small model in minutes.
    return " ".join([
        f"{owner} found an old {thing} in the {place} .",
        f"the {thing} was {_pick(rng, ADJECTIVES)} .",
        *fillers,
        f"{owner} showed the {thing} to {friend} .",
        f"at the end of the day , {friend} gave {owner} back the {thing}",
    ])


GENERATORS = {"arithmetic": _arithmetic, "grammar": _grammar, "code": _code, "cloze": _cloze}


def generate(domain: str, split: str, count: int, seed: int = 0, start: int = 0) -> list[str]:
    """Documents ``start .. start+count-1`` of ``domain`` in ``split``, identical on every call."""
    if domain not in GENERATORS:
        raise ValueError(f"domain: {domain!r} is not a demo domain; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not valid; choose one of {', '.join(SPLITS)}")
    return [GENERATORS[domain](_rng(seed, domain, split, i)) for i in range(start, start + count)]


def training_corpus(documents: int, seed: int = 0) -> list[str]:
    """A shuffled mixture of all domains from the train split (disjoint from eval and calibration)."""
    per_domain = -(-documents // len(DOMAINS))
    docs = [doc for domain in DOMAINS for doc in generate(domain, "train", per_domain, seed)]
    order = np.random.default_rng([seed, 99]).permutation(len(docs))
    return [docs[i] for i in order[:documents]]
