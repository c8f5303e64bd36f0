"""Figures draw what their inputs say: bar heights, line positions, image cells, error bars."""

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from scipy import stats

from routelab.catalogue import RUN_FIGURES
from routelab.plot.drawing import (
    bh_decisions,
    bh_pass_rate,
    correlation,
    expert_heatmap,
    expert_utilisation,
    experts_histogram,
    experts_histogram_from_counts,
    layer_experts_boxplot,
    logit_vs_pvalue,
    message_figure,
    pvalue_distribution,
    routing_sequence,
    token_rarity,
)


def bars(ax) -> dict[float, float]:
    """{bar centre: bar height} of a bar chart."""
    return {p.get_x() + p.get_width() / 2: p.get_height() for p in ax.patches}


def test_experts_histogram_has_one_integer_bar_per_k_between_bounds():
    fig = experts_histogram([1, 1, 2, 4, 4, 4], min_k=1, max_k=5)
    assert bars(fig.axes[0]) == pytest.approx({1: 2, 2: 1, 3: 0, 4: 3, 5: 0})


def line(ax, label: str):
    """The line of ``ax`` whose legend label starts with ``label``."""
    (found,) = [candidate for candidate in ax.lines if candidate.get_label().startswith(label)]
    return found


def test_experts_histogram_marks_mean_median_min_k_and_max_k():
    k = [1, 1, 2, 4, 4, 4]
    ax = experts_histogram(k, min_k=1, max_k=5).axes[0]
    assert list(line(ax, "mean").get_xdata()) == pytest.approx([np.mean(k)] * 2)
    assert list(line(ax, "median").get_xdata()) == pytest.approx([np.median(k)] * 2)  # 3: between 2 and 4
    assert list(line(ax, "min_k").get_xdata()) == [1, 1] and list(line(ax, "max_k").get_xdata()) == [5, 5]
    assert len({line(ax, label).get_linestyle() for label in ("mean", "median", "min_k", "max_k")}) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["KDE", "mean = 2.67", "median = 3",
                                                                   "min_k = 1", "max_k = 5"]


def test_experts_histogram_statistics_box_matches_numpy():
    k = np.array([2, 3, 3, 3, 5, 8, 8, 1])
    (box,) = experts_histogram(k, min_k=1, max_k=8).axes[0].texts
    assert box.get_text().split("\n") == [f"mean   {k.mean():.2f}", f"median {np.median(k):g}",
                                          f"std    {k.std():.2f}", "range  1–8"]


def test_experts_histogram_kde_is_scipys_kde_of_the_decisions_on_the_bar_scale():
    k = np.array([1, 1, 1, 2, 2, 3, 6])
    from_counts = experts_histogram_from_counts({"1": 3, "2": 2, "3": 1, "6": 1}, min_k=1, max_k=8)
    for fig in (experts_histogram(k, min_k=1, max_k=8), from_counts):
        kde = line(fig.axes[0], "KDE")
        assert kde.get_ydata() == pytest.approx(stats.gaussian_kde(k)(kde.get_xdata()) * k.size)


def test_experts_histogram_kde_bandwidth_is_at_least_half_an_expert():
    k = np.repeat([1, 2, 3], [5000, 900, 100])  # Scott's rule alone: 0.12, spikes at the integers
    kde = line(experts_histogram(k, min_k=1, max_k=4).axes[0], "KDE")
    reference = stats.gaussian_kde(k, bw_method=0.5 / np.std(k, ddof=1))
    assert kde.get_ydata() == pytest.approx(reference(kde.get_xdata()) * k.size)


def test_experts_histogram_of_a_fixed_k_draws_no_kde():
    ax = experts_histogram([8, 8, 8], min_k=8, max_k=8).axes[0]
    assert not [candidate for candidate in ax.lines if candidate.get_label() == "KDE"]
    assert ax.texts[0].get_text().endswith("std    0.00\nrange  8–8")


def test_experts_histogram_accepts_tensors():
    fig = experts_histogram(torch.tensor([3, 3, 8]), min_k=1, max_k=8)
    heights = bars(fig.axes[0])
    assert heights[3] == 2 and heights[8] == 1 and sum(heights.values()) == 3


def test_histogram_from_counts_matches_histogram_of_values():
    from_counts = experts_histogram_from_counts({"2": 3, "5": 1}, min_k=1, max_k=8, title="run")
    from_values = experts_histogram([2, 2, 2, 5], min_k=1, max_k=8)
    assert bars(from_counts.axes[0]) == bars(from_values.axes[0])
    assert list(line(from_counts.axes[0], "mean").get_xdata()) == pytest.approx([2.75, 2.75])
    assert from_counts.axes[0].get_title() == "run"


@pytest.mark.parametrize("call, name", [
    (lambda: experts_histogram([], 1, 8), "k is empty"),
    (lambda: experts_histogram([1.5, 2], 1, 8), "whole numbers"),
    (lambda: experts_histogram([1, 2], 4, 2), "min_k"),
    (lambda: experts_histogram_from_counts({}, 1, 8), "k_histogram is empty"),
    (lambda: experts_histogram_from_counts({"1": 0}, 1, 8), "sum to zero"),
])
def test_histogram_rejects_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_expert_heatmap_shows_percent_of_tokens_per_layer():
    counts = np.array([[2, 1, 1], [0, 3, 1]])
    fig = expert_heatmap(counts, tokens_per_layer=[2, 4])
    ax, colorbar = fig.axes
    assert np.asarray(ax.images[0].get_array()) == pytest.approx(np.array([[100, 50, 50], [0, 75, 25]]))
    assert colorbar.get_ylabel() == "% of tokens"
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "layer"


def test_expert_heatmap_without_tokens_shows_share_of_selections():
    fig = expert_heatmap(torch.tensor([[1, 3], [2, 2]]), title="t")
    image = np.asarray(fig.axes[0].images[0].get_array())
    assert image == pytest.approx(np.array([[25, 75], [50, 50]]))
    assert fig.axes[1].get_ylabel() == "% of selections"


@pytest.mark.parametrize("counts, tokens, name", [
    ([[1, 2], [3, 4]], [10], "tokens_per_layer"),
    ([[1, 2], [3, 4]], [10, 0], "tokens_per_layer"),
    (np.zeros((0, 4)), None, "counts"),
    ([1, 2, 3], None, "counts"),
])
def test_expert_heatmap_rejects_bad_input(counts, tokens, name):
    with pytest.raises(ValueError, match=name):
        expert_heatmap(counts, tokens_per_layer=tokens)


def test_figures_are_saved_atomically_only_when_given_a_path(tmp_path):
    path = tmp_path / "sub" / "hist.png"
    experts_histogram([1, 2], 1, 2)
    assert not path.parent.exists()
    experts_histogram([1, 2], 1, 2, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["hist.png"]


def test_message_figure_shows_centred_text():
    ax = message_figure("no BH runs in this experiment").axes[0]
    (text,) = ax.texts
    assert text.get_text() == "no BH runs in this experiment" and text.get_position() == (0.5, 0.5)


def test_run_figures_lists_the_ten_per_run_pngs_in_order():
    assert [figure.file for figure in RUN_FIGURES][:2] == ["experts_histogram.png", "expert_heatmap.png"]
    assert len(RUN_FIGURES) == 10 and all(f.file.endswith(".png") and f.title and f.label for f in RUN_FIGURES)


def test_pvalue_distribution_draws_density_histogram_and_ecdf_against_uniform():
    p = np.random.default_rng(0).uniform(size=500) ** 2  # skewed towards 0
    hist_ax, cdf_ax = pvalue_distribution(torch.tensor(p)).axes
    density, _ = np.histogram(p, bins=np.linspace(0, 1, 21), density=True)
    assert [patch.get_height() for patch in hist_ax.patches] == pytest.approx(density)
    assert list(line(hist_ax, "uniform").get_ydata()) == [1, 1]
    ecdf = line(cdf_ax, "empirical CDF")
    assert ecdf.get_ydata() == pytest.approx([np.mean(p <= x) for x in ecdf.get_xdata()])
    assert f"KS distance {stats.kstest(p, 'uniform').statistic:.3f}" in cdf_ax.texts[0].get_text()
    assert f"mean {p.mean():.3f}" in cdf_ax.texts[0].get_text()


@pytest.mark.parametrize("skew", [lambda u: u ** 2, lambda u: 1 - u ** 2])  # excess near 0, near 1
def test_pvalue_distribution_ks_distance_matches_scipy(skew):
    p = skew(np.random.default_rng(4).uniform(size=300))
    text = pvalue_distribution(p).axes[1].texts[0].get_text()
    assert text.startswith(f"KS distance {stats.kstest(p, 'uniform').statistic:.3f}\n")


@pytest.mark.parametrize("values, message", [([], "pvalues is empty"), ([0.2, 1.5], "pvalues must lie in"),
                                             ([0.2, np.nan], "pvalues must lie in")])
def test_pvalue_distribution_rejects_bad_input(values, message):
    with pytest.raises(ValueError, match=message):
        pvalue_distribution(values)


def test_logit_vs_pvalue_scatters_each_pair_coloured_by_layer():
    logits, pvalues, layers = [0.5, -1.0, 2.0, 0.0], [0.3, 0.9, 0.01, 0.5], [0, 0, 1, 1]
    fig = logit_vs_pvalue(logits, np.array(pvalues), torch.tensor(layers))
    (points,) = fig.axes[0].collections
    assert np.asarray(points.get_offsets()) == pytest.approx(np.column_stack([logits, pvalues]))
    assert list(points.get_array()) == layers
    assert fig.axes[1].get_ylabel() == "layer"


def test_logit_vs_pvalue_draws_a_fixed_sample_of_large_inputs():
    rng = np.random.default_rng(1)
    logits, layers = rng.normal(size=3000), rng.integers(0, 4, size=3000)
    pvalues = stats.norm.sf(logits)
    first, second = (logit_vs_pvalue(logits, pvalues, layers, max_points=200).axes[0].collections[0]
                     for _ in range(2))
    offsets = np.asarray(first.get_offsets())
    assert len(offsets) == 200 and np.array_equal(offsets, second.get_offsets())
    index = np.searchsorted(np.sort(logits), offsets[:, 0])  # every drawn point is a real (logit, p, layer)
    order = np.argsort(logits)
    assert offsets[:, 1] == pytest.approx(pvalues[order][index])
    assert list(first.get_array()) == list(layers[order][index])


def test_logit_vs_pvalue_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="layer has 1 entries but logits has 2"):
        logit_vs_pvalue([0.1, 0.2], [0.5, 0.4], [0])


def bh_sample(decisions: int, experts: int, alpha: float, seed: int = 0):
    """Sorted p-values, scipy's BH passing rank (number of BH-adjusted p-values <= alpha) and k."""
    rng = np.random.default_rng(seed)
    sorted_p = np.sort(rng.uniform(size=(decisions, experts)) ** 3, axis=1)
    ranks = (stats.false_discovery_control(sorted_p, axis=1) <= alpha).sum(axis=1)
    return sorted_p, ranks, np.clip(ranks, 1, 3)


def test_bh_decisions_draws_sorted_pvalues_bh_line_and_passing_rank():
    sorted_p, ranks, k = bh_sample(5, 8, alpha=0.3)
    fig = bh_decisions(sorted_p, 0.3, ranks, k, labels=[f"token {i}" for i in range(5)], max_panels=3)
    assert len(fig.axes) == 3
    shown = [int(ax.get_title().split()[1]) for ax in fig.axes]
    assert [ranks[i] for i in shown] == sorted(ranks[i] for i in shown)  # panels ordered by passing rank
    assert ranks[shown[0]] == ranks.min() and ranks[shown[-1]] == ranks.max()
    for ax, row in zip(fig.axes, shown):
        assert line(ax, "sorted").get_ydata() == pytest.approx(sorted_p[row])
        assert line(ax, "selected").get_ydata() == pytest.approx(sorted_p[row, :k[row]])
        assert line(ax, "i·α/N").get_ydata() == pytest.approx(np.arange(1, 9) * 0.3 / 8)
        if ranks[row]:
            assert list(line(ax, "passing rank").get_xdata()) == [ranks[row]] * 2
        else:
            assert "passing rank 0" in ax.texts[0].get_text()


@pytest.mark.parametrize("change, message", [
    (lambda p, r, k: (p[:, ::-1], r, k, 0.3), "ascending"),
    (lambda p, r, k: (p, r, k, 0.0), "alpha must be in"),
    (lambda p, r, k: (p, r, k[:-1], 0.3), "k has 3 entries but sorted_pvalues has 4"),
    (lambda p, r, k: (p, r + 9, k, 0.3), "passing_rank must lie in"),
])
def test_bh_figures_reject_bad_input(change, message):
    sorted_p, ranks, k, alpha = change(*bh_sample(4, 8, alpha=0.3))
    for plot in (bh_decisions, bh_pass_rate):
        with pytest.raises(ValueError, match=message):
            plot(sorted_p, alpha, ranks, k)


def test_bh_pass_rate_shows_own_test_step_up_and_clamped_selection_per_rank():
    alpha, experts = 0.4, 8
    sorted_p, ranks, k = bh_sample(200, experts, alpha, seed=3)
    ax = bh_pass_rate(sorted_p, alpha, ranks, k).axes[0]
    own = [100 * np.mean([row[i - 1] <= i * alpha / experts for row in sorted_p]) for i in range(1, 9)]
    step_up = [100 * np.mean(ranks >= i) for i in range(1, 9)]
    selected = [100 * np.mean(k >= i) for i in range(1, 9)]
    assert line(ax, "p_(i)").get_ydata() == pytest.approx(own)
    assert line(ax, "i ≤ passing rank").get_ydata() == pytest.approx(step_up)
    assert line(ax, "i ≤ k").get_ydata() == pytest.approx(selected)
    assert selected[0] == 100 and step_up[0] >= own[0]


def test_routing_sequence_shows_weights_of_used_experts_for_the_first_tokens():
    weights = np.full((2, 4, 6), np.nan)  # [layers, tokens, experts]
    weights[0, 0, 1], weights[0, 1, 4], weights[0, 2, 1], weights[0, 3, 5] = 0.5, 0.25, 0.75, 0.1
    weights[1, :, 2] = [0.2, 0.3, 0.4, 0.6]
    fig = routing_sequence(weights, ["a", "·b", "\\n", "c"], layers=[3, 7], max_tokens=3)
    first, second = fig.axes[:2]
    image = first.images[0].get_array()
    assert [t.get_text() for t in first.get_yticklabels()] == ["1", "4"]  # expert 5 only after token 3
    assert image.filled(-1) == pytest.approx(np.array([[0.5, -1, 0.75], [-1, 0.25, -1]]))
    assert second.images[0].get_array().filled(-1) == pytest.approx(np.array([[0.2, 0.3, 0.4]]))
    assert [t.get_text() for t in second.get_xticklabels()] == ["a", "·b", "\\n"]
    assert first.get_ylabel().startswith("layer 3") and second.get_ylabel().startswith("layer 7")
    assert fig.axes[2].get_ylabel() == "routing weight"


def test_routing_sequence_keeps_the_most_used_experts():
    weights = np.full((1, 5, 4), np.nan)
    weights[0, :, 3] = 0.5  # used 5 times
    weights[0, :3, 0] = 0.1  # 3 times
    weights[0, :1, 2] = 0.2  # once: dropped with max_experts=2
    ax = routing_sequence(weights, list("abcde"), max_experts=2).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "3"]


def test_routing_sequence_rejects_mismatched_tokens():
    with pytest.raises(ValueError, match="tokens has 2 entries"):
        routing_sequence(np.ones((1, 3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="weights must have 3"):
        routing_sequence(np.ones((3, 2)), ["a", "b", "c"])


def test_expert_utilisation_colours_experts_outside_mean_plus_minus_std():
    counts = np.array([[40, 10, 10, 16, 8, 0], [5, 5, 5, 5, 5, 5]])  # expert 3: above the mean, within std
    fig = expert_utilisation(counts, tokens_per_layer=[20, 10])
    skewed, flat = fig.axes
    share = 100 * counts[0] / 20
    mean, std = share.mean(), share.std()
    (bar_collection,) = skewed.collections
    corners = np.array([path.vertices[:4] for path in bar_collection.get_paths()])  # [bars, 4, (x, y)]
    assert corners[:, :, 0].mean(axis=1) == pytest.approx(np.arange(6))  # one bar per expert, centred
    assert corners[:, :, 1].max(axis=1) == pytest.approx(share) and corners[:, :, 1].min() == 0
    colours = [to_hex(colour) for colour in bar_collection.get_facecolor()]
    expected = ["C3" if s > mean + std else "C0" if s < mean - std else "0.6" for s in share]
    assert colours == [to_hex(c) for c in expected]
    assert list(skewed.lines[0].get_ydata()) == pytest.approx([mean, mean])
    (band,) = skewed.patches
    assert band.get_y() == pytest.approx(mean - std) and band.get_height() == pytest.approx(2 * std)
    assert skewed.texts[0].get_text() == f"CV {std / mean:.2f}\nmax/min ∞ (1 unused)"
    assert flat.texts[0].get_text() == "CV 0.00\nmax/min 1.0"
    assert skewed.get_ylabel() == "% of tokens" and skewed.get_title() == "layer 0"


def test_expert_utilisation_shows_at_most_max_panels_evenly_spaced_layers():
    fig = expert_utilisation(np.ones((10, 4)), max_panels=4)
    assert [ax.get_title() for ax in fig.axes] == ["layer 0", "layer 3", "layer 6", "layer 9"]


def test_token_rarity_scatters_rarity_fits_trend_and_reports_correlations():
    ids = np.array([5, 5, 5, 5, 7, 7, 9, 11])
    experts = np.array([1.0, 1.5, 1.0, 1.25, 2.0, 2.5, 3.0, 2.75])
    ax = token_rarity(torch.tensor(ids), experts).axes[0]
    frequency = {token: np.mean(ids == token) for token in set(ids.tolist())}
    rarity = np.array([-np.log10(frequency[token]) for token in ids])
    assert np.asarray(ax.collections[0].get_offsets()) == pytest.approx(np.column_stack([rarity, experts]))
    slope, intercept = np.polyfit(rarity, experts, 1)
    trend = line(ax, "least squares")
    assert trend.get_ydata() == pytest.approx(intercept + slope * trend.get_xdata())
    pearson, spearman = stats.pearsonr(rarity, experts), stats.spearmanr(rarity, experts)
    assert ax.texts[0].get_text() == (f"Pearson r = {pearson.statistic:.3f} (p = {pearson.pvalue:.2g})\n"
                                      f"Spearman ρ = {spearman.statistic:.3f} (p = {spearman.pvalue:.2g})\n"
                                      "n = 8 tokens")


@pytest.mark.parametrize("n", [3, 5, 40, 2000])
def test_correlation_equals_scipy_with_ties_and_at_perfect_correlation(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 6, n).astype(float)  # many ties
    y = x + rng.normal(scale=2.0, size=n)
    for a, b in ((x, y), (x, np.round(y)), (x, 3 * x + 1), (x, -x)):
        for ranks, reference in ((False, stats.pearsonr), (True, stats.spearmanr)):
            if np.ptp(a) == 0:
                continue
            expected = reference(a, b)
            r, p = correlation(a, b, ranks=ranks)
            assert r == pytest.approx(expected.statistic, abs=1e-12), (reference.__name__, ranks)
            assert p == pytest.approx(expected.pvalue, rel=1e-7, abs=1e-300), (reference.__name__, ranks)


def test_token_rarity_says_when_correlation_is_undefined():
    ax = token_rarity([1, 1, 2], [8, 8, 8]).axes[0]
    assert ax.texts[0].get_text().startswith("correlation undefined: experts selected is constant")
    assert not [candidate for candidate in ax.lines if candidate.get_label().startswith("least squares")]
    with pytest.raises(ValueError, match="experts has 2 entries but token_ids has 3"):
        token_rarity([1, 1, 2], [8, 8])


def test_layer_experts_boxplot_matches_matplotlib_box_statistics_and_means():
    from matplotlib.cbook import boxplot_stats

    rng = np.random.default_rng(2)
    layers = np.repeat([0, 1, 2], 300)
    k = np.concatenate([rng.poisson(2, 300) + 1, rng.poisson(4, 300) + 1, np.full(300, 2)])
    ax = layer_experts_boxplot(layers, torch.tensor(k)).axes[0]
    medians = [artist for artist in ax.lines if artist.get_gid() == "median"]
    boxes = [artist for artist in ax.lines if artist.get_gid() == "box"]
    whiskers = [artist for artist in ax.lines if artist.get_gid() == "whisker"]
    for layer in range(3):
        (reference,) = boxplot_stats(k[layers == layer])
        assert medians[layer].get_ydata()[0] == pytest.approx(reference["med"])
        assert (min(boxes[layer].get_ydata()), max(boxes[layer].get_ydata())) == pytest.approx(
            (reference["q1"], reference["q3"]))
        low, high = whiskers[2 * layer].get_ydata()[1], whiskers[2 * layer + 1].get_ydata()[1]
        assert (low, high) == pytest.approx((reference["whislo"], reference["whishi"]))
    fliers = [artist for artist in ax.lines if artist.get_gid() == "flier"]
    assert sorted(fliers[1].get_ydata()) == sorted(set(boxplot_stats(k[layers == 1])[0]["fliers"]))
    mean = line(ax, "mean")
    assert list(mean.get_xdata()) == [0, 1, 2]
    assert mean.get_ydata() == pytest.approx([k[layers == layer].mean() for layer in range(3)])


@pytest.mark.parametrize("layer, k, message", [([], [], "layer is empty"), ([0, 1], [1], "k has 1 entries"),
                                               ([0, 1], [1.5, 2], "k must hold whole numbers")])
def test_layer_experts_boxplot_rejects_bad_input(layer, k, message):
    with pytest.raises(ValueError, match=message):
        layer_experts_boxplot(layer, k)
