"""Evaluation windows with lm-evaluation-harness semantics.

A window is ``(input_ids, labels)`` of equal length: ``input_ids[i]`` predicts ``labels[i]``, and
``labels[i] == IGNORE`` marks positions that are context only. Every scored token of a document is
scored exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

IGNORE = -100


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Disjoint rolling windows over one document, as lm-eval's ``loglikelihood_rolling``.

    Mirrors ``get_rolling_token_windows(context_len=1)`` followed by ``make_disjoint_window``: the
    first window starts with ``prefix_token`` (the end-of-text token) and predicts the first
    ``max_len`` tokens; each later window predicts the next ``max_len`` tokens with the token before
    them as context; the last window is filled up with earlier tokens as extra context (scored
    positions only at its end).
    """
    if max_len < 1:
        raise ValueError(f"max_len: {max_len} must be >= 1")
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix_token] + tokens[: first - 1], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_len)
        end = predicted + n_pred
        inputs = tokens[max(end - max_len - 1, 0): end - 1]
        labels = [IGNORE] * (len(inputs) - n_pred) + tokens[end - n_pred: end]
        yield inputs, labels
        predicted = end


def cloze_window(context: list[int], continuation: list[int], max_len: int,
                 prefix_token: int | None = None) -> tuple[list[int], list[int]]:
    """One window scoring ``continuation`` after ``context`` (lm-eval ``loglikelihood``), left-truncated.

    An empty context becomes ``[prefix_token]`` (the end-of-text token), as in lm-eval.
    """
    if not continuation:
        raise ValueError("continuation: empty; a cloze target must have at least one token")
    if len(continuation) > max_len:
        raise ValueError(f"continuation: {len(continuation)} tokens do not fit a window of {max_len}")
    if not context:
        if prefix_token is None:
            raise ValueError("context: empty and no prefix_token given to stand in for it")
        context = [prefix_token]
    whole = (context + continuation)[-(max_len + 1):]
    inputs = whole[:-1]
    labels = [IGNORE] * (len(inputs) - len(continuation)) + continuation
    return inputs, labels


def split_cloze(text: str) -> tuple[str, str]:
    """LAMBADA convention: context = all but the last word, target = space + last word."""
    context, _, last = text.rstrip().rpartition(" ")
    if not context:
        raise ValueError(f"cloze document has a single word and no context: {text[:60]!r}")
    return context, " " + last


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize context+continuation together and split, as lm-eval's ``_encode_pair``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def count_words(text: str) -> int:
    """Word count as lm-eval's wikitext task (``len(re.split(r"\\s+", doc))``)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))
