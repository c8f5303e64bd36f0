"""Report statistics agree with independent references: binomial quantiles, scipy, rliable, hand-worked
examples."""

import math

import numpy as np
import pandas as pd
import pytest
from rliable import metrics as rliable_metrics
from scipy import stats as scipy_stats

from routelab.report import statistics as stats


def documents(n: int = 60, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 120, n)
    return pd.DataFrame({"doc_id": np.arange(n), "tokens": tokens,
                         "loglik": -tokens * rng.uniform(0.8, 1.6, n),
                         "correct": rng.random(n) < 0.3})


def test_bootstrap_ci_of_accuracy_matches_binomial_quantiles():
    """The bootstrap distribution of a mean of 0/1 values is Binomial(n, p̂) / n, so the percentile
    CI must sit on its quantiles (up to one step of 1/n from percentile interpolation)."""
    scores = documents(80)
    n, p = len(scores), scores["correct"].mean()
    estimate, low, high = stats.bootstrap_ci(scores, "acc", repetitions=20000, seed=3)
    assert estimate == pytest.approx(p)
    assert low == pytest.approx(scipy_stats.binom.ppf(0.025, n, p) / n, abs=1 / n + 1e-12)
    assert high == pytest.approx(scipy_stats.binom.ppf(0.975, n, p) / n, abs=1 / n + 1e-12)


def reference_ratio_bootstrap(loglik, tokens, repetitions, seed, confidence=0.95):
    """A plain-loop percentile bootstrap of exp(-ΣLL/Σtokens) over documents."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(repetitions):
        pick = rng.integers(0, len(loglik), len(loglik))
        values.append(math.exp(-loglik[pick].sum() / tokens[pick].sum()))
    tail = (1 - confidence) / 2 * 100
    return np.percentile(values, [tail, 100 - tail])


def test_bootstrap_ci_of_perplexity_resamples_documents_as_pairs():
    scores = documents(60)
    loglik, tokens = scores["loglik"].to_numpy(), scores["tokens"].to_numpy()
    estimate, low, high = stats.bootstrap_ci(scores, "perplexity", repetitions=20000, seed=0)
    assert estimate == pytest.approx(math.exp(-loglik.sum() / tokens.sum()))
    ref_low, ref_high = reference_ratio_bootstrap(loglik, tokens, 20000, seed=99)
    width = ref_high - ref_low
    assert low == pytest.approx(ref_low, abs=0.05 * width)
    assert high == pytest.approx(ref_high, abs=0.05 * width)
    assert low < estimate < high


def test_bootstrap_ci_is_seeded():
    scores = documents(40)
    first = stats.bootstrap_ci(scores, "perplexity", 500, seed=5)
    assert first == stats.bootstrap_ci(scores, "perplexity", 500, seed=5)
    assert first != stats.bootstrap_ci(scores, "perplexity", 500, seed=6)


@pytest.mark.parametrize("kwargs, message", [
    ({"metric": "bleu"}, "bleu"),
    ({"repetitions": 0}, "repetitions"),
    ({"confidence": 1.5}, "confidence"),
])
def test_bootstrap_ci_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stats.bootstrap_ci(documents(10), **{"metric": "perplexity", **kwargs})


def test_run_quality_intervals_gives_one_row_per_run():
    scores = pd.concat([documents(30, seed=s).assign(routing=r, dataset=d)
                        for s, (r, d) in enumerate([("a", "wiki"), ("b", "wiki"), ("a", "cloze")])])
    table = stats.run_quality_intervals(scores, {"wiki": ("perplexity", False), "cloze": ("acc", True)},
                                        repetitions=200)
    assert list(zip(table["routing"], table["dataset"], table["metric"])) == [
        ("a", "cloze", "acc"), ("a", "wiki", "perplexity"), ("b", "wiki", "perplexity")]
    assert (table["low"] <= table["estimate"]).all() and (table["estimate"] <= table["high"]).all()


def test_pareto_front_on_a_hand_made_example():
    # cost:     1    2    2    3    4    5   nan
    # quality:  5    4    6    3    3    2   1   (lower is better)
    cost = [1, 2, 2, 3, 4, 5, np.nan]
    quality = [5, 4, 6, 3, 3, 2, 1]
    # (2, 6) is beaten by (1, 5); (4, 3) by (3, 3); the NaN point never counts
    assert stats.pareto_front(cost, quality, higher_is_better=False).tolist() == [
        True, True, False, True, False, True, False]
    # higher is better: only (1, 5) and (2, 6) survive
    assert stats.pareto_front(cost, quality, higher_is_better=True).tolist() == [
        True, False, True, False, False, False, False]
    with pytest.raises(ValueError, match="cost and quality"):
        stats.pareto_front([1, 2], [1], True)


def test_normalized_entropy_is_one_for_equal_use_and_zero_for_one_expert():
    counts = np.array([[5, 5, 5, 5], [0, 0, 7, 0], [1, 1, 2, 0]])
    hand = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(4)
    assert stats.usage_entropy(counts, axis=1) == pytest.approx([1.0, 0.0, hand])
    with pytest.raises(ValueError, match="non-negative"):
        stats.usage_entropy([[1, -1]])


def test_correlation_matches_scipy_and_says_its_strength():
    x = np.array([0.1, 0.3, 0.2, 0.8, 0.5, 0.9])
    y = np.array([3.0, 2.6, 2.9, 1.5, 2.2, 1.7])
    result = stats.correlation(x, y)
    pearson, spearman = scipy_stats.pearsonr(x, y), scipy_stats.spearmanr(x, y)
    assert result["pearson_r"] == pytest.approx(pearson.statistic)
    assert result["pearson_p"] == pytest.approx(pearson.pvalue)
    assert result["spearman_rho"] == pytest.approx(spearman.statistic)
    assert result["spearman_p"] == pytest.approx(spearman.pvalue)
    assert result["n"] == 6
    assert result["strength"] == "very strong negative (Pearson), significant at 0.05"


@pytest.mark.parametrize("r, words", [(0.05, "negligible"), (-0.2, "weak negative"), (0.4, "moderate positive"),
                                      (0.6, "strong positive"), (-0.95, "very strong negative")])
def test_correlation_strength_words(r, words):
    assert stats.correlation_strength(r) == words


def test_correlation_of_constant_or_too_few_values_is_undefined():
    assert math.isnan(stats.correlation([1, 2, 3], [4, 4, 4])["pearson_r"])
    assert stats.correlation([1, 2], [3, 4])["strength"].startswith("undefined (n = 2")


def scores_table() -> pd.DataFrame:
    rows = []
    for routing, shift in (("base", 0.0), ("good", 0.1), ("bad", -0.2)):
        for dataset, n in (("wiki", 5), ("cloze", 4)):
            for doc in range(n):
                rows.append({"routing": routing, "dataset": dataset, "doc_id": doc, "tokens": 10 + doc,
                             "loglik": -(10 + doc) * (1.0 + 0.1 * doc) + shift * (10 + doc)})
    return pd.DataFrame(rows)


def test_relative_document_scores_are_per_token_likelihood_ratios_to_the_baseline():
    relative = stats.relative_document_scores(scores_table(), "base")
    assert set(relative) == {"wiki", "cloze"}
    wiki = relative["wiki"]
    assert wiki["base"].tolist() == pytest.approx([1.0] * 5)
    assert wiki["good"].tolist() == pytest.approx([math.exp(0.1)] * 5)
    assert wiki["bad"].tolist() == pytest.approx([math.exp(-0.2)] * 5)
    with pytest.raises(ValueError, match="'nope'"):
        stats.relative_document_scores(scores_table(), "nope")


def test_score_matrices_put_documents_first_and_truncate_to_the_smallest_dataset():
    matrices, datasets, num_docs = stats.score_matrices(stats.relative_document_scores(scores_table(), "base"))
    assert datasets == ["cloze", "wiki"] and num_docs == 4
    assert matrices["good"].shape == (4, 2)
    assert matrices["good"] == pytest.approx(np.full((4, 2), math.exp(0.1)))


def test_probability_of_improvement_equals_rliables_mann_whitney_version():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(0, 1, (30, 3)), 1)  # rounding makes ties
    y = np.round(rng.normal(0.2, 1, (25, 3)), 1)
    assert stats.probability_of_improvement(x, y) == pytest.approx(rliable_metrics.probability_of_improvement(x, y))
    assert stats.probability_of_improvement(x, x) == pytest.approx(0.5)


def test_interval_estimates_point_values_are_rliables_aggregates():
    rng = np.random.default_rng(1)
    matrices = {"a": rng.normal(1.0, 0.1, (50, 3)), "b": rng.normal(0.9, 0.2, (50, 3))}
    table = stats.interval_estimates(matrices, repetitions=300, seed=0)
    a = table[table["routing"] == "a"].set_index("metric")
    scores = matrices["a"]
    assert a.loc["median", "estimate"] == pytest.approx(np.median(scores.mean(axis=0)))
    assert a.loc["IQM", "estimate"] == pytest.approx(scipy_stats.trim_mean(scores.ravel(), 0.25))
    assert a.loc["mean", "estimate"] == pytest.approx(scores.mean())
    assert a.loc["optimality gap", "estimate"] == pytest.approx(1 - np.minimum(scores, 1).mean())
    assert (table["low"] <= table["estimate"] + 1e-12).all() and (table["estimate"] <= table["high"] + 1e-12).all()
    # seeded: the same call gives the same intervals, whatever else is in the dict
    again = stats.interval_estimates({"a": matrices["a"]}, repetitions=300, seed=0)
    assert again[["low", "high"]].to_numpy() == pytest.approx(a[["low", "high"]].to_numpy())


def test_stratified_bootstrap_ci_of_one_task_mean_matches_scipy_bootstrap():
    values = np.random.default_rng(2).normal(1.0, 0.3, 200)
    table = stats.interval_estimates({"a": values[:, None]}, repetitions=4000, seed=0).set_index("metric")
    reference = scipy_stats.bootstrap((values,), np.mean, n_resamples=4000, method="percentile",
                                      rng=np.random.default_rng(7)).confidence_interval
    width = reference.high - reference.low
    assert table.loc["mean", "low"] == pytest.approx(reference.low, abs=0.06 * width)
    assert table.loc["mean", "high"] == pytest.approx(reference.high, abs=0.06 * width)


def test_improvement_over_baseline_compares_only_with_the_baseline():
    base = np.ones((20, 2))
    better = np.full((20, 2), 1.1)
    mixed = np.column_stack([np.r_[np.full(5, 1.2), np.full(15, 0.9)], np.full(20, 1.0)])
    table = stats.improvement_over_baseline({"base": base, "better": better, "mixed": mixed}, "base",
                                            repetitions=200).set_index("routing")
    assert list(table.index) == ["better", "mixed"]
    assert table.loc["better", ["probability", "low", "high"]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # task 1: 5 of 20 documents better, none tied; task 2: all tied -> (0.25 + 0.5) / 2
    assert table.loc["mixed", "probability"] == pytest.approx(0.375)
    with pytest.raises(ValueError, match="baseline 'x'"):
        stats.improvement_over_baseline({"base": base}, "x")


def test_performance_profiles_are_fractions_of_scores_above_tau():
    scores = np.array([[0.8, 1.0], [1.2, 0.9], [1.1, 1.3]])
    taus = [0.85, 1.0, 1.25]
    table = stats.performance_profiles({"a": scores}, taus, repetitions=200)
    assert table["fraction"].tolist() == pytest.approx([(scores > tau).mean() for tau in taus])
    assert (table["low"] <= table["fraction"] + 1e-12).all()
    thresholds = stats.profile_thresholds({"a": scores})
    assert 1.0 in thresholds and thresholds.min() <= 0.81 and thresholds.max() >= 1.29


@pytest.mark.parametrize("shape", [(50, 3), (7, 2), (1, 1), (13, 5)])
def test_fast_aggregates_equal_rliables(shape):
    from rliable import library as rliable_library

    scores = np.random.default_rng(sum(shape)).normal(1.0, 0.2, shape)
    expected = [rliable_metrics.aggregate_median(scores), rliable_metrics.aggregate_iqm(scores),
                rliable_metrics.aggregate_mean(scores), rliable_metrics.aggregate_optimality_gap(scores, 1.0)]
    assert stats.aggregate_scores(scores) == pytest.approx(expected)
    taus = np.array([0.5, 0.9, 1.0, float(scores.ravel()[0]), 1.3])  # one tau equal to a score: strict >
    assert stats.score_distribution(scores, taus) == pytest.approx(rliable_library.score_distributions(scores, taus))


def test_task_scores_relative_to_the_baseline_average_to_the_ratio_of_task_scores():
    # an lm-eval task: per-sample accuracy, no log-likelihoods; hand-worked: baseline 3/4, config 2/4
    scores = pd.DataFrame({"routing": ["base"] * 4 + ["cfg"] * 4, "dataset": "task", "doc_id": [0, 1, 2, 3] * 2,
                           "acc": [1, 1, 1, 0, 1, 0, 1, 0]})
    relative = stats.relative_document_scores(scores, "base", {"task": ("acc", True)})["task"]
    assert relative["cfg"].tolist() == pytest.approx([1, 1 - 4 / 3, 1, 1])
    assert relative["cfg"].mean() == pytest.approx(0.5 / 0.75)
    lower = stats.relative_document_scores(scores, "base", {"task": ("acc", False)})["task"]
    assert lower["cfg"].mean() == pytest.approx(2 - 0.5 / 0.75)
    estimate, low, high = stats.bootstrap_ci(scores[scores["routing"] == "cfg"], "acc", repetitions=200)
    assert estimate == 0.5 and 0 <= low <= estimate <= high <= 1


def test_rliable_matrices_keep_every_config_and_leave_out_a_dataset_one_skipped():
    both = pd.DataFrame({"a": [1.0, 1.0], "b": [0.9, 1.1]})
    relative = {"text": both, "generation": pd.DataFrame({"a": [1.0, 1.0]})}  # b skipped the generation task
    matrices, datasets, docs = stats.score_matrices(relative)
    assert datasets == ["text"] and sorted(matrices) == ["a", "b"] and docs == 2
