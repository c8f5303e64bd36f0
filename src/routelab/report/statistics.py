"""Statistics of the cross-run report: bootstrap CIs over documents, Pareto frontiers, expert-usage
entropy, correlations, and rliable interval estimates.

The bootstrap unit everywhere is the document: per-document scores (``scores.parquet``: ``loglik``,
``tokens``, ``correct`` per document) are resampled with replacement, so an interval says how much
a metric would move on another sample of documents like these. Routing itself is deterministic, so
there is no seed-to-seed variance to resample.

rliable (Agarwal et al. 2021) expects ``{algorithm: scores [num_runs, num_tasks]}``. Here the tasks
are the datasets and the "runs" are documents, each scored relative to the baseline routing on the
same document (:func:`relative_document_scores`), so that scores of different datasets share one
scale (1 = the baseline's quality) and higher is better. rliable's stratified bootstrap resamples
rows within each task column independently, so a row need not be the same document in every
column; every column must have the same length, so each dataset contributes its first
``min(documents per dataset)`` documents (by ``doc_id``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

log = logging.getLogger(__name__)

# rliable aggregate metrics, in the order the report shows them.
AGGREGATE_METRICS = ("median", "IQM", "mean", "optimality gap")


# --------------------------------------------------------------------------- bootstrap over documents

def _ratio_perplexity(loglik: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    """Token perplexity exp(-ΣLL / Σtokens) along ``axis`` (vectorised over resamples)."""
    return np.exp(-np.sum(loglik, axis=axis) / np.sum(tokens, axis=axis))


def _accuracy(correct: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(correct, axis=axis)


def metric_statistic(metric: str, columns: Sequence[str] = ()):
    """``(score columns, vectorised statistic)`` that recomputes ``metric`` from per-document scores.

    Known metrics: ``perplexity`` (token perplexity, ratio of sums), ``acc`` (cloze accuracy, from
    ``correct``), and any metric that is itself one of the scores' ``columns`` (an lm-eval task's
    per-sample values, whose mean is lm-eval's score).
    """
    if metric == "perplexity":
        return ("loglik", "tokens"), _ratio_perplexity
    if metric in columns:
        return (metric,), _accuracy
    if metric == "acc":
        return ("correct",), _accuracy
    raise ValueError(f"metric {metric!r} has no document-level bootstrap; valid: perplexity, acc, or a "
                     "per-sample column of the scores")


def bootstrap_ci(scores: pd.DataFrame, metric: str, repetitions: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``metric`` over the documents of one run, with a percentile
    bootstrap CI that resamples whole documents (paired: a document's log-likelihood and token
    count travel together). Uses :func:`scipy.stats.bootstrap` with a generator seeded by ``seed``.

    ``scores``: one row per document with the columns :func:`metric_statistic` names.
    """
    columns, statistic = metric_statistic(metric, [c for c in scores.columns if scores[c].notna().all()])
    missing = [c for c in columns if c not in scores.columns]
    if missing:
        raise ValueError(f"scores lacks column(s) {missing} needed for {metric}")
    if len(scores) == 0:
        raise ValueError("scores is empty: no documents to bootstrap")
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    data = tuple(scores[c].to_numpy(dtype=float) for c in columns)
    estimate = float(statistic(*data))
    if len(scores) == 1:
        return estimate, estimate, estimate
    with warnings.catch_warnings():
        # identical documents (e.g. all cloze answers wrong) make a degenerate but valid interval
        warnings.simplefilter("ignore", scipy_stats.DegenerateDataWarning)
        result = scipy_stats.bootstrap(data, statistic, n_resamples=repetitions, paired=True,
                                       vectorized=True, confidence_level=confidence,
                                       method="percentile", rng=np.random.default_rng(seed))
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def run_quality_intervals(scores: pd.DataFrame, metric_by_dataset: Mapping[str, tuple[str, bool]],
                          repetitions: int = 2000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Bootstrap CI of every run's primary metric: ``routing, dataset, metric, estimate, low, high``.

    ``scores``: the tidy per-document table of all runs (``routing, dataset, doc_id, ...``).
    ``metric_by_dataset``: ``{dataset: (metric column, higher_is_better)}``.
    """
    require_columns(scores, ["routing", "dataset"], "scores")
    rows = []
    for (routing, dataset), documents in scores.groupby(["routing", "dataset"], sort=True):
        if dataset not in metric_by_dataset:
            continue
        metric = metric_by_dataset[dataset][0]
        estimate, low, high = bootstrap_ci(documents, metric, repetitions, confidence, seed)
        rows.append({"routing": routing, "dataset": dataset, "metric": metric, "estimate": estimate,
                     "low": low, "high": high})
    return pd.DataFrame(rows, columns=["routing", "dataset", "metric", "estimate", "low", "high"])


# --------------------------------------------------------------------------- Pareto frontier

def pareto_front(cost: Sequence[float], quality: Sequence[float], higher_is_better: bool) -> np.ndarray:
    """Boolean mask ``[points]`` of the Pareto-optimal points: no other point has lower-or-equal cost
    and better-or-equal quality with at least one of the two strictly better. NaN points are never
    optimal."""
    cost = np.asarray(cost, dtype=float)
    quality = np.asarray(quality, dtype=float)
    if cost.shape != quality.shape or cost.ndim != 1:
        raise ValueError(f"cost and quality must be 1-D of equal length, got {cost.shape} and {quality.shape}")
    goodness = quality if higher_is_better else -quality
    valid = np.isfinite(cost) & np.isfinite(goodness)
    front = np.zeros(cost.size, dtype=bool)
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        no_worse = others & (cost <= cost[i]) & (goodness >= goodness[i])
        strictly = (cost < cost[i]) | (goodness > goodness[i])
        front[i] = not np.any(no_worse & strictly)
    return front


# --------------------------------------------------------------------------- expert usage

def usage_entropy(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy of the usage distribution ``counts / sum(counts)`` along ``axis``, divided
    by log(number of experts): 1 = every expert used equally (equiprobability), 0 = one expert."""
    counts = np.asarray(counts, dtype=float)
    if counts.size == 0:
        raise ValueError("counts is empty")
    if np.any(counts < 0):
        raise ValueError("counts must be non-negative")
    n = counts.shape[axis]
    if n < 2:
        raise ValueError(f"counts needs at least 2 experts along axis {axis}, got {n}")
    return scipy_stats.entropy(counts, axis=axis) / np.log(n)


def correlation_strength(r: float) -> str:
    """Plain words for a correlation coefficient (|r| < 0.1 negligible, < 0.3 weak, < 0.5 moderate,
    < 0.7 strong, else very strong), with its direction."""
    if not np.isfinite(r):
        return "undefined"
    size = abs(r)
    words = ("negligible" if size < 0.1 else "weak" if size < 0.3 else "moderate" if size < 0.5
             else "strong" if size < 0.7 else "very strong")
    return words if words == "negligible" else f"{words} {'positive' if r > 0 else 'negative'}"


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | str]:
    """Pearson and Spearman correlation of ``x`` and ``y`` with their two-sided p-values and a
    plain-words summary. NaN pairs are dropped; fewer than 3 pairs or a constant side give NaN."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    result: dict[str, float | int | str] = {"n": int(x.size), "pearson_r": np.nan, "pearson_p": np.nan,
                                            "spearman_rho": np.nan, "spearman_p": np.nan}
    if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        pearson = scipy_stats.pearsonr(x, y)
        spearman = scipy_stats.spearmanr(x, y)
        result.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                      spearman_rho=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    result["strength"] = _strength_text(result)
    return result


def _strength_text(result: Mapping[str, float | int | str]) -> str:
    r, p = float(result["pearson_r"]), float(result["pearson_p"])
    if not np.isfinite(r):
        return f"undefined (n = {result['n']}: needs 3 or more points that vary)"
    significance = "significant at 0.05" if p < 0.05 else "not significant at 0.05"
    return f"{correlation_strength(r)} (Pearson), {significance}"


# --------------------------------------------------------------------------- rliable

def relative_document_scores(scores: pd.DataFrame, baseline: str,
                             metric_by_dataset: Mapping[str, tuple[str, bool]] | None = None
                             ) -> dict[str, pd.DataFrame]:
    """Per-document quality relative to the baseline routing on the same document:
    ``exp((LL_config − LL_baseline) / tokens)`` = the baseline's per-document perplexity divided by
    the config's (1 = as good as the baseline, above 1 = better). Cloze documents use the target
    log-likelihood the same way (their accuracy is 0/1 per document and has no ratio).

    A dataset without log-likelihoods (an lm-eval task: per-sample metric values, whose lm-eval score is
    their mean) takes its metric from ``metric_by_dataset`` and scores ``1 ± (x_config − x_baseline) /
    mean(x_baseline)`` (+ when higher is better): their mean is the ratio of the config's score to the
    baseline's (inverted for lower-is-better), as for perplexity. A baseline scoring 0 has no ratio: the
    dataset is left out.

    Returns ``{dataset: DataFrame [documents, routings]}`` indexed by doc_id; documents without
    scored tokens or missing from a routing are dropped.
    """
    require_columns(scores, ["routing", "dataset", "doc_id"], "scores")
    if baseline not in set(scores["routing"]):
        raise ValueError(f"baseline {baseline!r} has no per-document scores; routings with scores: "
                         f"{sorted(scores['routing'].unique())}")
    relative = {}
    for dataset, rows in scores.groupby("dataset", sort=True):
        if baseline not in set(rows["routing"]):
            raise ValueError(f"baseline {baseline!r} has no scores on dataset {dataset!r}")
        if "loglik" in rows.columns and rows["loglik"].notna().all():
            loglik = rows.pivot(index="doc_id", columns="routing", values="loglik")
            tokens = rows.pivot(index="doc_id", columns="routing", values="tokens")
            per_token = loglik.sub(loglik[baseline], axis=0).div(tokens[baseline], axis=0)
            valid = (tokens[baseline] > 0) & per_token.notna().all(axis=1)
            relative[dataset] = np.exp(per_token[valid]).sort_index()
            continue
        if metric_by_dataset is None or dataset not in metric_by_dataset:
            raise ValueError(f"dataset {dataset!r} has no log-likelihoods; give its metric in metric_by_dataset")
        metric, higher_is_better = metric_by_dataset[dataset]
        require_columns(rows, [metric], f"scores of dataset {dataset!r}")
        values = rows.pivot(index="doc_id", columns="routing", values=metric)
        scale = values[baseline].mean()
        if not scale:
            continue
        change = values.sub(values[baseline], axis=0) / scale
        valid = change.notna().all(axis=1)
        relative[dataset] = (1 + change[valid] if higher_is_better else 1 - change[valid]).sort_index()
    return relative


def score_matrices(relative: Mapping[str, pd.DataFrame]) -> tuple[dict[str, np.ndarray], list[str], int]:
    """rliable score matrices ``{routing: [documents, datasets]}`` (documents first), the dataset
    order of the columns and the number of documents per column (the smallest dataset's count). The
    datasets are those every routing config has scores on (all datasets if none is)."""
    if not relative:
        raise ValueError("relative is empty: no datasets")
    # Every routing config on the same datasets: a dataset some config does not run (a teacher-forced rule
    # skips generation tasks) is left out rather than the config.
    everyone = set.union(*(set(frame.columns) for frame in relative.values()))
    datasets = sorted(d for d in relative if set(relative[d].columns) == everyone) or sorted(relative)
    num_docs = min(len(relative[d]) for d in datasets)
    if num_docs == 0:
        raise ValueError("a dataset has no documents scored by every routing")
    routings = sorted(set.intersection(*(set(relative[d].columns) for d in datasets)))
    matrices = {routing: np.column_stack([relative[d][routing].to_numpy()[:num_docs] for d in datasets])
                for routing in routings}
    return matrices, datasets, num_docs


def interquartile_mean(scores: np.ndarray) -> float:
    """Mean of all scores between the 25 % and 75 % order statistics: rliable's ``aggregate_iqm``
    (``scipy.stats.trim_mean(scores, 0.25, axis=None)``) without scipy's per-call overhead, which
    dominates thousands of bootstrap calls."""
    flat = np.ravel(scores)
    cut = int(0.25 * flat.size)
    kept = np.partition(flat, (cut, flat.size - cut - 1))[cut:flat.size - cut]
    return float(kept.mean())


def aggregate_scores(scores: np.ndarray) -> np.ndarray:
    """rliable's aggregates of ``[runs, tasks]`` scores, in :data:`AGGREGATE_METRICS` order: median
    over tasks of the per-task mean, IQM, mean, and optimality gap at γ = 1 (the baseline's level)."""
    return np.array([np.median(scores.mean(axis=0)), interquartile_mean(scores), scores.mean(),
                     1.0 - np.minimum(scores, 1.0).mean()])


def score_distribution(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of all scores above each τ: rliable's ``score_distributions`` (its default profile),
    by one sort instead of one pass per τ."""
    flat = np.sort(np.ravel(scores))
    return 1.0 - np.searchsorted(flat, taus, side="right") / flat.size


def interval_estimates(matrices: Mapping[str, np.ndarray], repetitions: int = 2000,
                       confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """rliable stratified-bootstrap interval estimates of the aggregate metrics of every routing:
    ``routing, metric, estimate, low, high`` (metric one of :data:`AGGREGATE_METRICS`).

    numpy's global RNG is seeded with ``seed`` before each routing (rliable ignores its
    ``random_state`` argument), so a routing's interval does not depend on which others exist.
    """
    from rliable import library as rly

    rows = []
    for routing in sorted(matrices):
        np.random.seed(seed)
        point, interval = rly.get_interval_estimates({routing: matrices[routing]}, aggregate_scores,
                                                     reps=repetitions, confidence_interval_size=confidence)
        for i, metric in enumerate(AGGREGATE_METRICS):
            rows.append({"routing": routing, "metric": metric, "estimate": float(point[routing][i]),
                         "low": float(interval[routing][0, i]), "high": float(interval[routing][1, i])})
    return pd.DataFrame(rows, columns=["routing", "metric", "estimate", "low", "high"])


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """P(X > Y) per task (ties count one half), averaged over tasks: the statistic of rliable's
    ``metrics.probability_of_improvement`` (a Mann-Whitney U / (n_x n_y)), computed by sorting
    instead of ranking so that a bootstrap of it costs milliseconds, not seconds.

    ``scores_x``: ``[runs_x, tasks]``; ``scores_y``: ``[runs_y, tasks]``.
    """
    scores_x = np.asarray(scores_x, dtype=float)
    scores_y = np.asarray(scores_y, dtype=float)
    if scores_x.ndim != 2 or scores_y.ndim != 2 or scores_x.shape[1] != scores_y.shape[1]:
        raise ValueError(f"scores_x and scores_y must be [runs, tasks] with the same tasks, got "
                         f"{scores_x.shape} and {scores_y.shape}")
    probabilities = []
    for task in range(scores_x.shape[1]):
        y = np.sort(scores_y[:, task])
        below = np.searchsorted(y, scores_x[:, task], side="left")
        not_above = np.searchsorted(y, scores_x[:, task], side="right")
        wins = below.sum() + 0.5 * (not_above - below).sum()
        probabilities.append(wins / (scores_x.shape[0] * y.size))
    return float(np.mean(probabilities))


def improvement_over_baseline(matrices: Mapping[str, np.ndarray], baseline: str, repetitions: int = 2000,
                              confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """rliable probability of improvement P(X > baseline) of every other routing X, averaged over
    datasets, with stratified-bootstrap CIs: ``routing, probability, low, high``. Only pairs with
    the baseline (each pair costs a bootstrap of Mann-Whitney statistics)."""
    from rliable import library as rly

    if baseline not in matrices:
        raise ValueError(f"baseline {baseline!r} is not among the routings {sorted(matrices)}")
    rows = []
    for routing in sorted(matrices):
        if routing == baseline:
            continue
        np.random.seed(seed)
        point, interval = rly.get_interval_estimates(
            {routing: [matrices[routing], matrices[baseline]]}, probability_of_improvement,
            reps=repetitions, confidence_interval_size=confidence)
        low, high = np.ravel(interval[routing])
        rows.append({"routing": routing, "probability": float(point[routing]), "low": float(low),
                     "high": float(high)})
    return pd.DataFrame(rows, columns=["routing", "probability", "low", "high"])


def performance_profiles(matrices: Mapping[str, np.ndarray], taus: Sequence[float], repetitions: int = 2000,
                         confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """rliable score distributions: for every routing and threshold τ the fraction of (document,
    dataset) scores above τ, with stratified-bootstrap CIs: ``routing, tau, fraction, low, high``."""
    from rliable import library as rly

    taus = np.asarray(taus, dtype=float)
    if taus.ndim != 1 or taus.size == 0:
        raise ValueError("taus must be a non-empty 1-D sequence")
    rows = []
    for routing in sorted(matrices):
        np.random.seed(seed)
        profiles, intervals = rly.create_performance_profile({routing: matrices[routing]}, taus,
                                                             custom_profile_func=score_distribution,
                                                             reps=repetitions,
                                                             confidence_interval_size=confidence)
        rows.append(pd.DataFrame({"routing": routing, "tau": taus, "fraction": profiles[routing],
                                  "low": intervals[routing][0], "high": intervals[routing][1]}))
    return pd.concat(rows, ignore_index=True)


def profile_thresholds(matrices: Mapping[str, np.ndarray], points: int = 41) -> np.ndarray:
    """``points`` thresholds spanning the 1st to 99th percentile of all scores (always including 1,
    the baseline's level), so the profiles show where the routings differ."""
    values = np.concatenate([m.ravel() for m in matrices.values()])
    low, high = np.percentile(values, [1, 99])
    low, high = min(low, 1.0), max(high, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.05, high + 0.05
    return np.unique(np.append(np.linspace(low, high, points), 1.0))


def require_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """A ValueError naming ``name``'s missing columns, or saying it is empty."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{name} is empty")
