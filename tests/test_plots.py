"""Figures draw what their inputs say: bar heights, line positions, image cells, error bars."""

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection

from routelab.plots import (expert_heatmap, experts_histogram, experts_histogram_from_counts,
                            experts_vs_alpha, message_figure, quality_vs_experts)


def bars(ax) -> dict[float, float]:
    """{bar centre: bar height} of a bar chart."""
    return {p.get_x() + p.get_width() / 2: p.get_height() for p in ax.patches}


def test_experts_histogram_has_one_integer_bar_per_k_between_bounds():
    fig = experts_histogram([1, 1, 2, 4, 4, 4], min_k=1, max_k=5)
    assert bars(fig.axes[0]) == pytest.approx({1: 2, 2: 1, 3: 0, 4: 3, 5: 0})


def test_experts_histogram_marks_mean_min_k_and_max_k():
    ax = experts_histogram([1, 1, 2, 4, 4, 4], min_k=1, max_k=5).axes[0]
    mean, floor, ceiling = ax.lines
    assert list(mean.get_xdata()) == pytest.approx([16 / 6, 16 / 6])
    assert list(floor.get_xdata()) == [1, 1] and list(ceiling.get_xdata()) == [5, 5]
    assert len({line.get_linestyle() for line in ax.lines}) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mean = 2.67", "min_k = 1", "max_k = 5"]


def test_experts_histogram_accepts_tensors():
    fig = experts_histogram(torch.tensor([3, 3, 8]), min_k=1, max_k=8)
    heights = bars(fig.axes[0])
    assert heights[3] == 2 and heights[8] == 1 and sum(heights.values()) == 3


def test_histogram_from_counts_matches_histogram_of_values():
    from_counts = experts_histogram_from_counts({"2": 3, "5": 1}, min_k=1, max_k=8, title="run")
    from_values = experts_histogram([2, 2, 2, 5], min_k=1, max_k=8)
    assert bars(from_counts.axes[0]) == bars(from_values.axes[0])
    assert list(from_counts.axes[0].lines[0].get_xdata()) == pytest.approx([2.75, 2.75])
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


def test_message_figure_shows_centred_text():
    ax = message_figure("no BH runs in this experiment").axes[0]
    (text,) = ax.texts
    assert text.get_text() == "no BH runs in this experiment" and text.get_position() == (0.5, 0.5)
