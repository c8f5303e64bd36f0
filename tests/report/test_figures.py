"""Cross-run figures draw what their inputs say: error bars, frontier steps, bubble sizes, CI bars,
profile curves, scaled axes, co-activation cells."""


import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.text import Text
from scipy import stats as scipy_stats

from routelab.report.figures import (
    coactivation_heatmap,
    coactivation_rate,
    domain_specialisation,
    efficiency_parallel_coordinates,
    entropy_vs_quality,
    expert_bubble_heatmap,
    experts_vs_alpha,
    improvement_plot,
    interval_estimates_plot,
    performance_profile_plot,
    quality_vs_experts,
    router_diagnostics,
    routing_style,
    specialisation_order,
)


def bh_table() -> pd.DataFrame:
    return pd.DataFrame({
        "dataset": ["arith", "arith", "arith", "arith", "wiki"],
        "alpha": [0.01, 0.1, 0.01, 0.1, 0.05],
        "max_k": [8, 8, 4, 4, 8],
        "experts_mean": [2.0, 3.0, 1.5, 2.5, 4.0],
        "experts_std": [0.5, 0.7, 0.2, 0.3, 1.0],
    }).iloc[::-1]  # unsorted input: lines must still run in alpha order


def test_experts_vs_alpha_draws_one_errorbar_line_per_max_k_and_dataset():
    fig = experts_vs_alpha(bh_table(), baseline_experts={"arith": 8.0, "wiki": 6.0},
                           baseline_label="top-k baseline (k = 8)")
    arith, wiki = fig.axes
    assert arith.get_title() == "arith" and wiki.get_title() == "wiki"
    assert arith.get_xscale() == "log"
    (line4, _, (bars4,)), (line8, _, (bars8,)) = [c.lines for c in arith.containers]
    assert list(line4.get_xdata()) == [0.01, 0.1] and list(line4.get_ydata()) == [1.5, 2.5]
    assert list(line8.get_ydata()) == [2.0, 3.0]
    assert np.asarray(bars8.get_segments()) == pytest.approx(np.array([[[0.01, 1.5], [0.01, 2.5]],
                                                             [[0.1, 2.3], [0.1, 3.7]]]))
    labels = [t.get_text() for t in arith.get_legend().get_texts()]
    assert labels == ["top-k baseline (k = 8)", "max_k = 4", "max_k = 8"]
    assert wiki.containers[0].lines[0].get_color() == line8.get_color() != line4.get_color()
    baseline = [line for line in wiki.lines if line.get_linestyle() == "--"]
    assert list(baseline[0].get_ydata()) == [6.0, 6.0]


def test_experts_vs_alpha_adds_a_varying_parameter_to_the_line_key():
    table = bh_table().assign(temperature=[1.0, 1.0, 2.0, 2.0, 1.0], max_k=8)
    ax = experts_vs_alpha(table, baseline_experts=8.0).axes[0]
    assert len(ax.containers) == 2
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"max_k = 8, temperature = 1",
                                                                   "max_k = 8, temperature = 2"}


def test_experts_vs_alpha_rejects_missing_columns_and_empty_table():
    with pytest.raises(ValueError, match="experts_std"):
        experts_vs_alpha(bh_table().drop(columns="experts_std"))
    with pytest.raises(ValueError, match="table is empty"):
        experts_vs_alpha(bh_table().iloc[:0])


def quality_table() -> pd.DataFrame:
    return pd.DataFrame({
        "routing": ["topk8", "bh_a0.05", "bh_a0.1", "topk8", "bh_a0.05"],
        "dataset": ["arith", "arith", "arith", "cloze", "cloze"],
        "method": ["topk", "bh", "bh", "topk", "bh"],
        "experts_mean": [8.0, 3.0, 4.0, 8.0, 2.0],
        "perplexity": [3.0, 3.5, 3.2, np.nan, np.nan],
        "acc": [np.nan, np.nan, np.nan, 0.6, 0.5],
    })


def test_quality_vs_experts_scatters_each_run_coloured_by_method_and_rings_baseline():
    metrics = {"arith": ("perplexity", False), "cloze": ("acc", True)}
    fig = quality_vs_experts(quality_table(), metrics, baseline="topk8")
    arith, cloze = fig.axes
    scatters = [c for c in arith.collections if isinstance(c, PathCollection)]
    bh, topk, ring = (np.asarray(s.get_offsets()) for s in scatters)
    assert bh.tolist() == [[3.0, 3.5], [4.0, 3.2]] and topk.tolist() == [[8.0, 3.0]]
    assert ring.tolist() == [[8.0, 3.0]]
    assert sorted(t.get_text() for t in arith.texts) == ["bh_a0.05", "bh_a0.1", "topk8"]
    assert arith.get_ylabel() == "perplexity (lower is better)"
    assert cloze.get_ylabel() == "acc (higher is better)"
    assert np.asarray(cloze.collections[0].get_offsets()).tolist() == [[2.0, 0.5]]
    # the same method has the same colour in every panel
    assert (arith.collections[0].get_facecolor() == cloze.collections[0].get_facecolor()).all()


def test_quality_vs_experts_requires_a_metric_for_every_dataset():
    with pytest.raises(ValueError, match="cloze"):
        quality_vs_experts(quality_table(), {"arith": ("perplexity", False)})
    with pytest.raises(ValueError, match="bleu"):
        quality_vs_experts(quality_table(), {"arith": ("bleu", True), "cloze": ("acc", True)})


def test_quality_vs_experts_draws_ci_bars_and_the_pareto_frontier():
    metrics = {"arith": ("perplexity", False), "cloze": ("acc", True)}
    intervals = pd.DataFrame({"routing": ["topk8", "bh_a0.05", "bh_a0.1"], "dataset": "arith",
                              "low": [2.9, 3.3, 3.0], "high": [3.1, 3.8, 3.3]})
    ax = quality_vs_experts(quality_table(), metrics, baseline="topk8", intervals=intervals).axes[0]
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segments = np.array(sorted(np.asarray(s).tolist() for s in bars.get_segments()))
    assert segments == pytest.approx(np.array([[[3.0, 3.3], [3.0, 3.8]], [[4.0, 3.0], [4.0, 3.3]],
                                               [[8.0, 2.9], [8.0, 3.1]]]))
    # lower perplexity is better: every point is on the frontier (3 < 4 < 8 experts, 3.5 > 3.2 > 3.0)
    (frontier,) = [line for line in ax.lines if line.get_label() == "Pareto frontier"]
    assert list(frontier.get_xdata()) == [3.0, 4.0, 8.0] and list(frontier.get_ydata()) == [3.5, 3.2, 3.0]
    assert frontier.get_drawstyle() == "steps-post"


def test_quality_vs_flops_uses_the_requested_cost_and_drops_dominated_points():
    table = quality_table().assign(flops=[10.0, 5.0, 6.0, 10.0, 4.0], perplexity=[3.0, 3.5, 3.6, np.nan, np.nan])
    fig = quality_vs_experts(table, {"arith": ("perplexity", False), "cloze": ("acc", True)}, x="flops",
                             x_label="FLOPs")
    ax = fig.axes[0]
    (frontier,) = [line for line in ax.lines if line.get_label() == "Pareto frontier"]
    assert list(frontier.get_xdata()) == [5.0, 10.0]  # bh_a0.1 (6, 3.6) is beaten by bh_a0.05 (5, 3.5)
    assert ax.get_xlabel() == "FLOPs"
    with pytest.raises(ValueError, match="flops"):
        quality_vs_experts(quality_table(), {"arith": ("perplexity", False), "cloze": ("acc", True)}, x="flops")


def test_expert_bubble_heatmap_sizes_bubbles_by_relative_share():
    counts = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    fig = expert_bubble_heatmap(counts, ["a", "b"], entropy=[0.81, 1.0], max_area=100)
    ax = fig.axes[0]
    bubbles = ax.collections[0]
    # shares: a = [0.25, 0.75], b = [0.5, 0.5]; relative to the largest share 0.75
    assert np.asarray(bubbles.get_offsets()).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert bubbles.get_sizes() == pytest.approx(100 * np.array([1 / 3, 1, 2 / 3, 2 / 3]))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    right = fig.axes[-1]  # the entropies are the right-hand axis' labels, row by row
    assert [t.get_text() for t in right.get_yticklabels()] == ["H = 0.810", "H = 1.000"]
    assert right.get_ylim() == ax.get_ylim()


@pytest.mark.parametrize("weights, configs, entropy, name", [
    ([[1, 2]], ["a", "b"], None, "configs"),
    ([[1, 2], [0, 0]], ["a", "b"], None, "sums to zero"),
    ([[1, 2]], ["a"], [0.5, 0.5], "entropy"),
    (np.zeros((0, 3)), [], None, "weights"),
])
def test_expert_bubble_heatmap_rejects_bad_input(weights, configs, entropy, name):
    with pytest.raises(ValueError, match=name):
        expert_bubble_heatmap(weights, configs, entropy)


def test_entropy_vs_quality_reports_scipys_correlations():
    table = pd.DataFrame({"routing": list("abcde"), "dataset": "wiki", "entropy": [0.5, 0.6, 0.7, 0.8, 0.9],
                          "perplexity": [5.0, 4.8, 4.9, 4.1, 4.0]})
    ax = entropy_vs_quality(table, {"wiki": ("perplexity", False)}).axes[0]
    assert np.asarray(ax.collections[0].get_offsets()).tolist() == table[["entropy", "perplexity"]].values.tolist()
    text = ax.get_xlabel()  # the statistics sit under the axis label, clear of the points
    pearson = scipy_stats.pearsonr(table["entropy"], table["perplexity"])
    spearman = scipy_stats.spearmanr(table["entropy"], table["perplexity"])
    assert f"Pearson r = {pearson.statistic:.2f} (p = {pearson.pvalue:.2g})" in text
    assert f"Spearman ρ = {spearman.statistic:.2f}" in text
    assert "very strong negative" in text
    with pytest.raises(ValueError, match="wiki"):
        entropy_vs_quality(table, {"cloze": ("acc", True)})


def interval_table() -> pd.DataFrame:
    rows = []
    for routing, shift in (("topk8", 0.0), ("bh", -0.1)):
        for metric in ("median", "IQM", "mean", "optimality gap"):
            base = 0.05 if metric == "optimality gap" else 1.0
            rows.append({"routing": routing, "metric": metric, "estimate": base + shift,
                         "low": base + shift - 0.02, "high": base + shift + 0.03})
    return pd.DataFrame(rows)


def test_interval_estimates_plot_draws_one_ci_bar_per_routing_and_metric():
    fig = interval_estimates_plot(interval_table(), baseline="topk8")
    assert [ax.get_title() for ax in fig.axes] == ["median", "IQM", "mean", "optimality gap"]
    median = fig.axes[0]
    bars = np.asarray(median.collections[0].get_segments())  # rows: bh (y = 0), topk8 (y = 1)
    assert bars == pytest.approx(np.array([[[0.88, 0], [0.93, 0]], [[0.98, 1], [1.03, 1]]]))
    assert np.asarray(median.collections[1].get_offsets()) == pytest.approx(np.array([[0.9, 0], [1.0, 1]]))
    assert [t.get_text() for t in median.get_yticklabels()] == ["bh", "topk8"]


def test_improvement_plot_draws_probabilities_with_their_intervals():
    table = pd.DataFrame({"routing": ["b", "a"], "probability": [0.7, 0.4], "low": [0.6, 0.3], "high": [0.8, 0.5]})
    ax = improvement_plot(table, "topk8").axes[0]
    assert np.asarray(ax.collections[0].get_segments()) == pytest.approx(
        np.array([[[0.3, 0], [0.5, 0]], [[0.6, 1], [0.8, 1]]]))
    assert np.asarray(ax.collections[1].get_offsets())[:, 0].tolist() == pytest.approx([0.4, 0.7])
    assert "topk8" in ax.get_xlabel()
    assert [list(line.get_xdata()) for line in ax.lines] == [[0.5, 0.5]]


def test_performance_profile_plot_draws_each_profile_and_marks_tau_one():
    taus = [0.9, 1.0, 1.1]
    table = pd.DataFrame({"routing": ["a"] * 3 + ["base"] * 3, "tau": taus * 2,
                          "fraction": [0.9, 0.5, 0.2, 1.0, 0.0, 0.0], "low": 0.0, "high": 1.0})
    ax = performance_profile_plot(table, baseline="base").axes[0]
    a, base, tau_line = ax.lines
    assert list(a.get_ydata()) == [0.9, 0.5, 0.2] and list(base.get_ydata()) == [1.0, 0.0, 0.0]
    assert base.get_linestyle() == "--" and list(tau_line.get_xdata()) == [1.0, 1.0]


def test_efficiency_parallel_coordinates_scale_each_axis_to_its_range():
    table = pd.DataFrame({"routing": ["a", "b", "c"], "flops": [10.0, 20.0, 40.0], "memory": [5.0, 5.0, 5.0],
                          "quality": [0.9, 1.0, 1.1]})
    axes = [("flops", "FLOPs"), ("memory", "memory"), ("quality", "quality")]
    ax = efficiency_parallel_coordinates(table, axes, baseline="b").axes[0]
    lines = [line for line in ax.lines if line.get_label() in ("a", "b", "c")]
    assert np.array([line.get_ydata() for line in lines]) == pytest.approx(
        np.array([[0.0, 0.5, 0.0], [1 / 3, 0.5, 0.5], [1.0, 0.5, 1.0]]))
    assert lines[1].get_linestyle() == "--"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["FLOPs", "memory", "quality"]
    assert {"10", "40", "0.9", "1.1"} <= {t.get_text() for t in ax.texts}
    with pytest.raises(ValueError, match="speed"):
        efficiency_parallel_coordinates(table, [("speed", "speed")])


def test_specialisation_order_groups_experts_by_peak_dataset_most_specialised_first():
    # ratio to uniform, rows = datasets (code, wiki), columns = experts 0..3
    ratio = np.array([[1.0, 3.0, 0.5, 2.0],
                      [1.0, 1.0, 1.5, 0.0]])
    order, peak = specialisation_order(ratio)
    # peaks: 0 -> code (tie, first row), 1 -> code, 2 -> wiki, 3 -> code
    # specialisation max / mean: e0 1, e1 3 / 2 = 1.5, e2 1.5 / 1 = 1.5, e3 2 / 1 = 2
    assert peak.tolist() == [0, 0, 1, 0]
    assert order.tolist() == [3, 1, 0, 2]


def share_table(datasets, num_experts, layers=(0,), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for dataset in datasets:
        for layer in layers:
            share = rng.gamma(2.0, size=num_experts)
            rows.append(pd.DataFrame({"dataset": dataset, "layer": layer, "expert": np.arange(num_experts),
                                      "share": 800.0 * share / share.sum()}))
    return pd.concat(rows, ignore_index=True)


def test_domain_specialisation_draws_a_dataset_by_expert_heatmap_in_specialisation_order():
    # experts 0..3; code uses expert 2 four times evenly, wiki expert 0 twice
    table = pd.DataFrame({"dataset": ["code"] * 4 + ["wiki"] * 4, "layer": 1, "expert": [0, 1, 2, 3] * 2,
                          "share": [25.0, 25.0, 100.0, 50.0, 50.0, 25.0, 25.0, 25.0]})
    fig = domain_specialisation(table, uniform=25.0)
    ax = fig.axes[0]
    # ratios: code [1, 1, 4, 2], wiki [2, 1, 1, 1] -> code's group: 2 (4 / 2.5), 3 (2 / 1.5), 1 (1 / 1);
    # wiki's: 0
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "3", "1", "0"]
    assert np.asarray(ax.images[0].get_array()) == pytest.approx(np.array([[4, 2, 1, 1], [1, 1, 1, 2]]))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["code", "wiki"] and ax.get_title() == "layer 1"
    (boundary,) = [line for line in ax.lines]
    assert boundary.get_xdata()[0] == 2.5  # between code's group and wiki's
    with pytest.raises(ValueError, match="layers"):
        domain_specialisation(table, layers=[3])


def test_domain_specialisation_without_uniform_uses_each_datasets_mean_share():
    table = pd.DataFrame({"dataset": "code", "layer": 0, "expert": [0, 1], "share": [30.0, 10.0]})
    image = domain_specialisation(table).axes[0].images[0]
    assert np.asarray(image.get_array()).tolist() == [[1.5, 0.5]]


def test_domain_specialisation_at_256_experts_has_no_expert_ticks_and_a_colour_bar():
    datasets = ["arithmetic", "code", "cloze", "grammar", "wiki", "bracket_choice", "close_brackets"]
    fig = domain_specialisation(share_table(datasets, 256, layers=(0, 8)), uniform=100 * 8 / 256)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 2 and all(len(ax.get_xticks()) == 0 for ax in heatmaps)
    assert len(fig.axes) == 3  # the colour bar
    assert no_overlapping_labels(fig)


def diagnostic_quantiles(routings, layers, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for routing in routings:
        for layer in layers:
            for statistic in ("router_entropy_norm", "top1_margin"):
                values = np.sort(rng.random(5))
                rows += [{"routing": routing, "layer": layer, "statistic": statistic, "quantile": q, "value": v}
                         for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), values)]
    return pd.DataFrame(rows)


def test_router_diagnostics_draws_each_routings_quantile_bars_per_layer_and_statistic():
    quantiles = pd.DataFrame({"routing": "topk8", "layer": 0, "statistic": "top1_margin",
                              "quantile": [0.05, 0.25, 0.5, 0.75, 0.95], "value": [0.0, 0.1, 0.2, 0.3, 0.6]})
    quantiles = pd.concat([quantiles, quantiles.assign(statistic="router_entropy_norm", value=[0.5, 0.6, 0.7,
                                                                                              0.8, 0.9])])
    fig = router_diagnostics(quantiles, baseline="topk8")
    entropy, margin = fig.axes
    thin, thick = (np.asarray(c.get_segments()) for c in margin.collections[:2])
    assert thin.tolist() == [[[0.0, 0], [0.6, 0]]] and thick.tolist() == [[[0.1, 0], [0.3, 0]]]
    assert np.asarray(margin.collections[2].get_offsets()).tolist() == [[0.2, 0]]
    assert [line.get_xdata()[0] for line in entropy.lines] == [0.7]  # the baseline's median
    assert [t.get_text() for t in entropy.get_yticklabels()] == ["topk8"]
    with pytest.raises(ValueError, match="quantile"):
        router_diagnostics(quantiles[quantiles["quantile"] != 0.95])
    with pytest.raises(ValueError, match="layers"):
        router_diagnostics(quantiles, layers=[4])


def test_router_diagnostics_with_20_configs_and_6_layers_keeps_its_labels_apart():
    routings = [f"config_{i:02d}" for i in range(20)]
    fig = router_diagnostics(diagnostic_quantiles(routings, range(16)), baseline="config_03",
                             layers=[0, 3, 6, 9, 12, 15])
    assert len(fig.axes) == 12
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == routings
    assert no_overlapping_labels(fig)


def test_coactivation_rate_is_the_share_of_an_experts_tokens_shared_with_another():
    # tokens: {0, 1}, {0, 1}, {0, 2}, {1}
    counts = np.array([[3, 2, 1], [2, 3, 0], [1, 0, 1]])
    rate = coactivation_rate(counts)
    assert np.isnan(np.diag(rate)).all()
    off = rate[~np.eye(3, dtype=bool)]
    assert off == pytest.approx([2 / 3, 1 / 3, 2 / 3, 0.0, 1.0, 0.0])
    assert np.isnan(coactivation_rate([[0, 0], [0, 2]])[0, 1])
    with pytest.raises(ValueError, match="square"):
        coactivation_rate([[1, 2, 3], [4, 5, 6]])


def test_coactivation_heatmap_draws_one_panel_per_config():
    counts = {"a": np.array([[3, 2, 1], [2, 3, 0], [1, 0, 1]]), "b": torch.eye(3) * 4}
    fig = coactivation_heatmap(counts, layer=2)
    a, b = fig.axes[:2]
    assert a.get_title() == "a" and b.get_title() == "b"
    image = np.ma.filled(a.images[0].get_array(), np.nan)
    assert np.allclose(image, coactivation_rate(counts["a"]), equal_nan=True)
    assert fig.get_suptitle() == "expert co-activation in layer 2"
    with pytest.raises(ValueError, match="counts is empty"):
        coactivation_heatmap({})


def no_overlapping_labels(fig) -> bool:
    """True when no two texts of one panel (point labels, tick labels, axis labels, title) and no two
    figure-level texts overlap on the drawn figure."""
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else None
    if renderer is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    for ax in fig.axes:
        texts = [*ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label, ax.title]
        # Text's own extent: an annotation's would include its leader line
        boxes = [Text.get_window_extent(t, renderer) for t in texts if t.get_visible() and t.get_text()]
        for i, first in enumerate(boxes):
            for second in boxes[i + 1:]:
                if first.overlaps(second) and first.intersection(first, second).width > 0.5 \
                        and first.intersection(first, second).height > 0.5:
                    return False
    return True


def crowded_quality_table(configs: int = 20) -> pd.DataFrame:
    """Many configs on one dataset, several tied on quality and cost (as accuracies on few documents are)."""
    rng = np.random.default_rng(1)
    experts = np.round(rng.uniform(1, 16, configs), 1)
    experts[:4] = 8.0
    acc = np.round(rng.uniform(0.4, 0.5, configs), 2)
    acc[:6] = 0.45
    return pd.DataFrame({"routing": [f"routing_config_{i}" for i in range(configs)], "dataset": "cloze",
                         "method": [f"m{i % 7}" for i in range(configs)], "experts_mean": experts, "acc": acc})


def test_quality_vs_experts_labels_20_crowded_configs_without_overlaps():
    table = crowded_quality_table()
    fig = quality_vs_experts(table, {"cloze": ("acc", True)}, baseline="routing_config_0")
    ax = fig.axes[0]
    named = sorted(name for t in ax.texts for name in t.get_text().replace(",\n", ", ").split(", "))
    assert named == sorted(table["routing"])  # every config named once; tied points share a label
    assert any(", " in t.get_text() for t in ax.texts)  # the four at (8, 0.45) share one
    assert no_overlapping_labels(fig)


def test_no_overlapping_labels_detects_an_overlap():
    from matplotlib.figure import Figure
    fig = Figure()
    ax = fig.subplots()
    ax.text(0.5, 0.5, "first label")
    ax.text(0.52, 0.5, "second label")
    assert not no_overlapping_labels(fig)


def test_routing_styles_stay_distinct_for_40_configs():
    styles = {(routing_style(i)["color"], routing_style(i)["linestyle"]) for i in range(40)}
    assert len(styles) == 40
