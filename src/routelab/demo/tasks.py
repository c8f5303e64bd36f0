"""Downstream tasks on the demo corpus, as the documents lm-eval's ``custom_dataset`` hook loads.

- ``cloze_choice`` (lm-eval ``multiple_choice``): a cloze passage without its last word; choose that
  word among it and three objects the passage never names. Chance: 1 / :data:`CHOICES`.
- ``close_brackets`` (lm-eval ``generate_until``): a code document up to the closing brackets that
  end it; generate them. Exact match needs both the bracket types and where to stop.
- ``bracket_choice`` (lm-eval ``multiple_choice``): the same cut code documents, those closing two
  brackets or more; choose the closers among them and three other sequences of as many closers.
  Chance: 1 / :data:`CHOICES`.

Documents come from the corpus's eval split only (the demo model never trains on it). Document ``i``
is a pure function of ``(seed, i)``, so ``documents=n`` is the first ``n`` of any longer dataset.
The task YAMLs in ``config/tasks/`` say how lm-eval scores them.
"""

from __future__ import annotations

import itertools

import numpy as np

from routelab.demo import corpus as demo_corpus

SPLIT = "eval"
CHOICES = 4
# A random stream per task, apart from the corpus's own (seeded by [seed, domain, split, index]).
CLOZE_CHOICE_STREAM = 101
BRACKET_CHOICE_STREAM = 102
# One closer has only two wrong sequences of its length (three bracket types); two have eight.
BRACKET_CHOICE_MIN_CLOSERS = 2


def _check(seed, documents) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r} is not valid; give an integer")
    if isinstance(documents, bool) or not isinstance(documents, int) or documents < 1:
        raise ValueError(f"documents: {documents!r} is not valid; give a positive integer")


def _test_split(rows: list[dict]):
    """``rows`` as the only split lm-eval reads (``test_split: test``)."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows)})


def cloze_choice_document(passage: str, rng: np.random.Generator) -> dict:
    """``{"context", "choices", "gold"}`` of one cloze passage: ``choices`` holds the passage's last
    word at index ``gold`` and ``CHOICES - 1`` objects that appear nowhere in the passage."""
    context, _, answer = passage.rpartition(" ")
    named = set(passage.split())
    others = [thing for thing in demo_corpus.OBJECTS if thing not in named]
    distractors = [str(thing) for thing in rng.choice(others, size=CHOICES - 1, replace=False)]
    gold = int(rng.integers(CHOICES))
    return {"context": context, "choices": distractors[:gold] + [answer] + distractors[gold:], "gold": gold}


def cloze_choice(seed: int = 0, documents: int = 40):
    """``DatasetDict({"test": ...})`` of ``documents`` cloze-choice documents (columns context,
    choices, gold) from the first eval-split cloze passages of corpus seed ``seed``."""
    _check(seed, documents)
    passages = demo_corpus.generate("cloze", SPLIT, documents, seed=seed)
    return _test_split([
        cloze_choice_document(passage, np.random.default_rng([seed, CLOZE_CHOICE_STREAM, index]))
        for index, passage in enumerate(passages)
    ])


def close_brackets_document(text: str) -> dict | None:
    """``{"context", "target"}`` of one code document: ``context`` stops before the closing brackets
    that end its last line, ``target`` is those brackets as the corpus spaces them (``" ] )"``);
    None when the last line's expression ends in no bracket (``return x ;``)."""
    words = text.split(" ")
    assert words[-1] == ";", text  # every corpus code line ends with " ;"
    closers = {close for _, close in demo_corpus.BRACKETS}
    count = 0
    while words[-2 - count] in closers:
        count += 1
    if count == 0:
        return None
    return {"context": " ".join(words[:-1 - count]), "target": " " + " ".join(words[-1 - count:-1])}


def _close_brackets_rows(seed: int):
    """Every eval-split code document of corpus seed ``seed`` whose last line ends in a bracket, in
    corpus order: :func:`close_brackets_document`'s row plus its ``corpus_index``."""
    for corpus_index in itertools.count():
        (text,) = demo_corpus.generate("code", SPLIT, 1, seed=seed, start=corpus_index)
        row = close_brackets_document(text)
        if row is not None:
            yield {**row, "corpus_index": corpus_index}


def close_brackets(seed: int = 0, documents: int = 40):
    """``DatasetDict({"test": ...})`` of ``documents`` bracket-closing questions (columns context,
    target, corpus_index) from the first eval-split code documents of corpus seed ``seed`` whose last
    line ends in a bracket (about two in three)."""
    _check(seed, documents)
    return _test_split(list(itertools.islice(_close_brackets_rows(seed), documents)))


def bracket_choice_document(row: dict, rng: np.random.Generator) -> dict:
    """``{"context", "choices", "gold", "corpus_index"}`` of one :func:`close_brackets` row:
    ``choices`` holds its closers at index ``gold`` (spaced, without the leading space: ``"] )"``) and
    ``CHOICES - 1`` other sequences of as many closers, drawn uniformly without replacement."""
    answer = tuple(row["target"].split())
    closers = [close for _, close in demo_corpus.BRACKETS]
    others = [" ".join(sequence) for sequence in itertools.product(closers, repeat=len(answer))
              if sequence != answer]
    assert len(others) >= CHOICES - 1, row  # BRACKET_CHOICE_MIN_CLOSERS keeps enough sequences
    distractors = [others[int(i)] for i in rng.choice(len(others), size=CHOICES - 1, replace=False)]
    gold = int(rng.integers(CHOICES))
    choices = distractors[:gold] + [" ".join(answer)] + distractors[gold:]
    return {"context": row["context"], "choices": choices, "gold": gold, "corpus_index": row["corpus_index"]}


def bracket_choice(seed: int = 0, documents: int = 40):
    """``DatasetDict({"test": ...})`` of ``documents`` bracket-choice documents (columns context,
    choices, gold, corpus_index) from the first :func:`close_brackets` rows of corpus seed ``seed``
    that close :data:`BRACKET_CHOICE_MIN_CLOSERS` brackets or more (about two in three)."""
    _check(seed, documents)
    rows = (row for row in _close_brackets_rows(seed)
            if len(row["target"].split()) >= BRACKET_CHOICE_MIN_CLOSERS)
    return _test_split([
        bracket_choice_document(row, np.random.default_rng([seed, BRACKET_CHOICE_STREAM, row["corpus_index"]]))
        for row in itertools.islice(rows, documents)
    ])
