"""Evaluation windows and counts with lm-evaluation-harness semantics (its code, verbatim, is the reference)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from routelab.data.windows import (
    IGNORE,
    cloze_window,
    count_bytes,
    count_words,
    prefix_token_id,
    rolling_windows,
    split_cloze,
)


def get_rolling_token_windows(token_list, prefix_token, max_seq_len, context_len):
    assert 1 <= context_len <= max_seq_len
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (token_list[window_end - max_seq_len - 1 : window_end - 1],
               token_list[window_end - window_pred_len : window_end])
        predicted += window_pred_len


def make_disjoint_window(pair):
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


def lm_eval_rolling(tokens, prefix_token, max_len):
    """lm-eval's loglikelihood_rolling in routelab's form: the model reads ``context + continuation[:-1]``
    and the last ``len(continuation)`` positions score ``continuation``."""
    out = []
    for context, continuation in map(make_disjoint_window,
                                     get_rolling_token_windows(tokens, prefix_token, max_len, context_len=1)):
        inputs = (context + continuation)[:-1]
        out.append((inputs, [IGNORE] * (len(inputs) - len(continuation)) + continuation))
    return out


def lm_eval_loglikelihood_window(context, continuation, max_length):
    """lm-eval HFLM._loglikelihood_tokens: inp = (ctx + cont)[-(max_length+1):][:-1], score the last len(cont)."""
    inputs = (context + continuation)[-(max_length + 1):][:-1]
    return inputs, [IGNORE] * (len(inputs) - len(continuation)) + continuation


def lm_eval_lambada_split(text):
    """lm-eval lambada: context = text.rsplit(" ", 1)[0], target = " " + text.rsplit(" ", 1)[1]."""
    return text.rsplit(" ", 1)[0], " " + text.rsplit(" ", 1)[1]


@pytest.mark.parametrize("max_len", [1, 2, 3, 5, 8, 16])
def test_rolling_windows_match_lm_eval(max_len):
    for length in range(0, 40):
        tokens = list(range(1000, 1000 + length))
        assert list(rolling_windows(tokens, 7, max_len)) == lm_eval_rolling(tokens, 7, max_len), (length, max_len)


def test_rolling_windows_score_every_token_once_and_fit_max_len():
    rng = np.random.default_rng(0)
    for _ in range(200):
        length, max_len = int(rng.integers(1, 300)), int(rng.integers(1, 64))
        tokens = rng.integers(0, 50_000, size=length).tolist()
        windows = list(rolling_windows(tokens, 0, max_len))
        scored = [label for _, labels in windows for label in labels if label != IGNORE]
        assert scored == tokens
        # Causal LM: input i predicts label i, so every input is the document token right before its
        # label's position (the prefix token before position 0), and context labels come first.
        position = 0
        for inputs, labels in windows:
            assert len(inputs) == len(labels) <= max_len
            n = sum(label != IGNORE for label in labels)
            assert labels[: len(labels) - n] == [IGNORE] * (len(labels) - n)
            assert inputs == ([0] + tokens)[position + n - len(inputs): position + n]
            position += n


def test_rolling_windows_hand_worked():
    # 7 tokens, max_len 3, prefix 0:
    #   window 1: reads [0, 11, 12] and scores [11, 12, 13]
    #   window 2: scores the next three, 14, 15, 16, each read after the token before it: [13, 14, 15]
    #   window 3: one token (17) left; the window is filled up with earlier tokens as context, up to the
    #             token before 17: reads [14, 15, 16], scores only the last position.
    tokens = [11, 12, 13, 14, 15, 16, 17]
    assert list(rolling_windows(tokens, 0, 3)) == [
        ([0, 11, 12], [11, 12, 13]),
        ([13, 14, 15], [14, 15, 16]),
        ([14, 15, 16], [IGNORE, IGNORE, 17]),
    ]
    assert list(rolling_windows([5], 0, 4)) == [([0], [5])]
    assert list(rolling_windows([], 0, 4)) == []


def test_rolling_windows_rejects_bad_max_len():
    with pytest.raises(ValueError, match="max_len"):
        list(rolling_windows([1, 2], 0, 0))


@pytest.mark.parametrize("max_len", [2, 4, 8, 64])
def test_cloze_window_matches_lm_eval(max_len):
    rng = np.random.default_rng(max_len)
    for _ in range(100):
        context = rng.integers(0, 100, size=rng.integers(1, 30)).tolist()
        continuation = rng.integers(100, 200, size=rng.integers(1, max_len + 1)).tolist()
        inputs, labels = cloze_window(context, continuation, max_len)
        assert (inputs, labels) == lm_eval_loglikelihood_window(context, continuation, max_len)
        assert len(inputs) == len(labels) <= max_len
        assert [label for label in labels if label != IGNORE] == continuation
        assert inputs[-len(continuation):] == (context + continuation)[-len(continuation) - 1:-1]


def test_cloze_window_hand_worked():
    # context [1, 2, 3], target [8, 9], max_len 3: the model reads the last 3 of [1, 2, 3, 8] = [2, 3, 8];
    # position 1 (token 3) predicts 8, position 2 (token 8) predicts 9.
    assert cloze_window([1, 2, 3], [8, 9], 3) == ([2, 3, 8], [IGNORE, 8, 9])
    assert cloze_window([1, 2, 3], [8, 9], 10) == ([1, 2, 3, 8], [IGNORE, IGNORE, 8, 9])
    with pytest.raises(ValueError, match="continuation"):
        cloze_window([1], [], 4)


@pytest.mark.parametrize("context,continuation,max_len", [([1, 2, 3], [7, 8, 9, 10], 3), ([], [7, 8], 4)],
                         ids=["continuation longer than max_len", "empty context"])
def test_cloze_window_never_returns_mismatched_lengths(context, continuation, max_len):
    try:
        inputs, labels = cloze_window(context, continuation, max_len)
    except ValueError:
        return
    assert len(inputs) == len(labels), (inputs, labels)


@pytest.mark.parametrize("text", [
    "anna found an old lamp in the attic . anna gave ben back the lamp",
    "two words",
    "a b\nc",  # the last word is whatever follows the last space, newlines included
    "commas, and. punctuation stay",
])
def test_split_cloze_matches_lm_eval(text):
    assert split_cloze(text) == lm_eval_lambada_split(text)
    context, target = split_cloze(text)
    assert context + target == text


def test_split_cloze_hand_worked_and_errors():
    assert split_cloze("the red kite ") == ("the red", " kite")  # trailing space stripped first
    with pytest.raises(ValueError, match="single word"):
        split_cloze("lonely")


@pytest.mark.parametrize("text,words", [
    ("one two three", 3),
    ("one  two\tthree\nfour", 4),
    (" leading and trailing ", 5),  # lm-eval counts the empty strings at both ends: ['', 'leading', ..., '']
    ("", 1),
])
def test_count_words_matches_lm_eval(text, words):
    assert len(re.split(r"\s+", text)) == words  # the hand count is lm-eval's
    assert count_words(text) == words


def test_count_bytes_is_utf8_length():
    assert count_bytes("abc") == 3
    assert count_bytes("é€") == 2 + 3
    assert count_bytes("😀") == 4


def lm_eval_prefix_token_id(tokenizer):
    """lm-eval HFLM.prefix_token_id (no custom prefix_token_id): BOS if the tokenizer has one, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


@pytest.mark.parametrize("bos,eos", [(5, 0), (None, 0), (0, 0), (7, None)], ids=["bos and eos", "eos only",
                                                                                  "bos is id 0", "bos only"])
def test_prefix_token_id_matches_lm_eval(bos, eos):
    tokenizer = SimpleNamespace(bos_token_id=bos, eos_token_id=eos, name_or_path="tiny")
    assert prefix_token_id(tokenizer) == lm_eval_prefix_token_id(tokenizer)


def test_prefix_token_id_names_a_tokenizer_without_bos_or_eos():
    tokenizer = SimpleNamespace(bos_token_id=None, eos_token_id=None, name_or_path="models/bare")
    with pytest.raises(ValueError, match=r"tokenizer 'models/bare': has neither a bos_token nor an eos_token"):
        prefix_token_id(tokenizer)
