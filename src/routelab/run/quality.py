"""Quality metrics with lm-evaluation-harness definitions, from per-document scores.

Per-document scores (one row per document) carry ``loglik`` (summed natural-log likelihood of its
scored tokens), ``tokens`` (scored tokens), ``words`` / ``bytes`` (counted on the original text) and
``correct`` (greedy decoding reproduced every scored token).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def token_perplexity(loglik: np.ndarray, tokens: np.ndarray) -> float:
    """exp(-sum LL / sum tokens)."""
    return math.exp(-np.sum(loglik) / np.sum(tokens))


def word_perplexity(loglik: np.ndarray, words: np.ndarray) -> float:
    """lm-eval ``word_perplexity``: exp(-sum LL / sum words)."""
    return math.exp(-np.sum(loglik) / np.sum(words))


def byte_perplexity(loglik: np.ndarray, n_bytes: np.ndarray) -> float:
    """lm-eval ``byte_perplexity``: exp(-sum LL / sum bytes)."""
    return math.exp(-np.sum(loglik) / np.sum(n_bytes))


def bits_per_byte(loglik: np.ndarray, n_bytes: np.ndarray) -> float:
    """lm-eval ``bits_per_byte``: -sum LL / sum bytes / ln 2."""
    return float(-np.sum(loglik) / np.sum(n_bytes) / math.log(2))


def cloze_accuracy(correct: np.ndarray) -> float:
    """LAMBADA ``acc``: share of documents whose greedy continuation equals every target token."""
    return float(np.mean(correct))


def cloze_perplexity(loglik: np.ndarray) -> float:
    """LAMBADA ``perplexity``: exp(-mean over documents of the summed target log-likelihood)."""
    return math.exp(-np.mean(loglik))


def quality_metrics(scores: pd.DataFrame, task: str) -> dict[str, float]:
    """All metrics of a task from per-document scores (see module docstring for the columns)."""
    ll, tokens = scores["loglik"].to_numpy(), scores["tokens"].to_numpy()
    metrics = {"documents": int(len(scores)), "tokens": int(tokens.sum()),
               "nll_per_token": float(-ll.sum() / tokens.sum()), "perplexity": token_perplexity(ll, tokens)}
    if task == "cloze":
        metrics["acc"] = cloze_accuracy(scores["correct"].to_numpy())
        metrics["cloze_perplexity"] = cloze_perplexity(ll)
    else:
        metrics["word_perplexity"] = word_perplexity(ll, scores["words"].to_numpy())
        metrics["byte_perplexity"] = byte_perplexity(ll, scores["bytes"].to_numpy())
        metrics["bits_per_byte"] = bits_per_byte(ll, scores["bytes"].to_numpy())
    return metrics


# The headline quality number of each task and whether larger is better (used by the report).
PRIMARY_METRIC = {"perplexity": ("perplexity", False), "cloze": ("acc", True)}
