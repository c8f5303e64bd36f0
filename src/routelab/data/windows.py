"""Evaluation windows with lm-evaluation-harness semantics.

A window is ``(input_ids, labels)`` of equal length: ``input_ids[i]`` predicts ``labels[i]``, and
``labels[i] == IGNORE`` marks positions that are context only. Every scored token of a document is
scored exactly once. Text is tokenized as lm-eval's ``HFLM`` does (``prefix_token_id``, ``encode_text``,
``encode_pair``), so the windows are the ones lm-eval would score.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

IGNORE = -100


def prefix_token_id(tokenizer) -> int:
    """The token a document's first window, and an empty cloze context, start from: lm-eval HFLM's
    ``prefix_token_id`` -- the tokenizer's BOS token if it has one, else its EOS token."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: has neither a bos_token nor an eos_token; the first "
                     "window needs one of them as its context (use a tokenizer that defines either)")


def encode_text(tokenizer, text: str, add_bos_token: bool | None = None) -> list[int]:
    """``text``'s token ids as lm-eval HFLM's ``tok_encode(text)``, which ``loglikelihood_rolling`` and
    ``_encode_pair`` use.

    ``add_bos_token`` is HFLM's model argument: None leaves the special tokens to the tokenizer's own
    default, True/False is passed as ``add_special_tokens``. A text that already starts with the prefix
    token's string gets no special tokens, as in lm-eval.
    """
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    if text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        kwargs = {"add_special_tokens": False}
    return tokenizer.encode(text, **kwargs)


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Disjoint rolling windows over one document, as lm-eval's ``loglikelihood_rolling``.

    Mirrors ``get_rolling_token_windows(context_len=1)`` followed by ``make_disjoint_window``: the
    first window starts with ``prefix_token`` (:func:`prefix_token_id`) and predicts the first
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

    An empty context becomes ``[prefix_token]`` (:func:`prefix_token_id`), as in lm-eval.
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


def encode_pair(tokenizer, context: str, continuation: str,
                add_bos_token: bool | None = None) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` of one request, as lm-eval's ``TemplateLM.loglikelihood``.

    An empty context is the prefix token (or the continuation's first token, when that is the prefix
    token). Otherwise, as ``_encode_pair``: trailing context spaces move to the continuation, then
    context+continuation are tokenized together (:func:`encode_text`) and split after the context's tokens.
    """
    if context == "":
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation, add_bos_token)
    ctx = encode_text(tokenizer, context, add_bos_token)
    return ctx, whole[len(ctx):]


def count_words(text: str) -> int:
    """Word count as lm-eval's wikitext task (``len(re.split(r"\\s+", doc))``)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))
