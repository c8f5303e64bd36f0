"""Quality metrics with lm-evaluation-harness definitions, on hand-worked documents."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from routelab.run.quality import (
    bits_per_byte,
    byte_perplexity,
    cloze_accuracy,
    cloze_perplexity,
    quality_metrics,
    token_perplexity,
    word_perplexity,
)

# Two perplexity documents (natural-log likelihoods):
#   sum LL = -10, sum tokens = 6, sum words = 5, sum bytes = 16
#   token perplexity = exp(10 / 6) = 5.29449005...
#   word perplexity  = exp(10 / 5) = exp(2) = 7.38905610...
#   byte perplexity  = exp(10 / 16) = exp(0.625) = 1.86824595...
#   bits per byte    = 10 / 16 / ln 2 = 0.625 / 0.69314718 = 0.90168440...
PERPLEXITY_DOCS = pd.DataFrame({"loglik": [-6.0, -4.0], "tokens": [4, 2], "words": [3, 2], "bytes": [10, 6]})


# Two cloze documents: summed target LL -1 and -3 (1 and 2 target tokens), the first greedy-correct:
#   acc = 1 / 2 = 0.5
#   cloze perplexity = exp(-mean(-1, -3)) = exp(2) = 7.38905610...   (per document, not per token:
#   the per-token value would be exp(4 / 3) = 3.79366789...)
CLOZE_DOCS = pd.DataFrame({"loglik": [-1.0, -3.0], "tokens": [1, 2], "correct": [True, False]})


def test_perplexity_formulas_hand_worked():
    ll = PERPLEXITY_DOCS["loglik"].to_numpy()
    assert token_perplexity(ll, PERPLEXITY_DOCS["tokens"].to_numpy()) == pytest.approx(5.29449005, rel=1e-8)
    assert word_perplexity(ll, PERPLEXITY_DOCS["words"].to_numpy()) == pytest.approx(7.38905610, rel=1e-8)
    assert byte_perplexity(ll, PERPLEXITY_DOCS["bytes"].to_numpy()) == pytest.approx(1.86824595, rel=1e-8)
    assert bits_per_byte(ll, PERPLEXITY_DOCS["bytes"].to_numpy()) == pytest.approx(0.90168440, rel=1e-8)


def test_bits_per_byte_is_log2_of_byte_perplexity():
    ll, n_bytes = np.array([-3.7, -12.1, -0.4]), np.array([11, 40, 2])
    assert bits_per_byte(ll, n_bytes) == pytest.approx(math.log2(byte_perplexity(ll, n_bytes)), rel=1e-12)


def test_cloze_formulas_hand_worked():
    assert cloze_accuracy(CLOZE_DOCS["correct"].to_numpy()) == 0.5
    assert cloze_perplexity(CLOZE_DOCS["loglik"].to_numpy()) == pytest.approx(7.38905610, rel=1e-8)


def test_quality_metrics_per_task():
    metrics = quality_metrics(PERPLEXITY_DOCS, "perplexity")
    assert metrics == pytest.approx({
        "documents": 2, "tokens": 6, "nll_per_token": 10 / 6, "perplexity": 5.29449005,
        "word_perplexity": 7.38905610, "byte_perplexity": 1.86824595, "bits_per_byte": 0.90168440}, rel=1e-8)
    metrics = quality_metrics(CLOZE_DOCS, "cloze")
    assert metrics == pytest.approx({
        "documents": 2, "tokens": 3, "nll_per_token": 4 / 3, "perplexity": 3.79366789,
        "acc": 0.5, "cloze_perplexity": 7.38905610}, rel=1e-8)
