"""Router diagnostics: entropy and top-1 / top-2 margin of the router's probabilities, as histograms
per (run, layer), checked against scipy and hand-worked examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as scipy_stats

from routelab.report import diagnostics
from routelab.report.diagnostics import (
    collect_router_diagnostics,
    entropy_nats,
    histogram_quantiles,
    layer_histograms,
    pooled_quantiles,
    probability_margin,
    router_probabilities,
    token_statistics,
)


def test_softmax_probabilities_and_their_entropy_match_scipy():
    # softmax of log(4, 2, 2, 1) is (4, 2, 2, 1) / 9
    logits = np.log([[4.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]) + 3.0  # a shift changes nothing
    probs = router_probabilities(logits)
    assert probs == pytest.approx(np.array([[4, 2, 2, 1], [1, 1, 1, 1]]) / np.array([[9.0], [4.0]]))
    assert entropy_nats(probs) == pytest.approx(scipy_stats.entropy([[4, 2, 2, 1], [1, 1, 1, 1]], axis=1))
    assert entropy_nats(probs)[1] == pytest.approx(math.log(4))


def test_sigmoid_probabilities_are_the_normalised_sigmoid_scores():
    # sigmoid(log 3) = 3/4 and sigmoid(0) = 1/2: normalised 0.6 and 0.4
    probs = router_probabilities(np.array([[math.log(3.0), 0.0]]), score="sigmoid")
    assert probs == pytest.approx(np.array([[0.6, 0.4]]))
    with pytest.raises(ValueError, match="'tanh'.*softmax"):
        router_probabilities(np.zeros((1, 2)), score="tanh")
    with pytest.raises(ValueError, match="experts >= 2"):
        router_probabilities(np.zeros(4))


def test_entropy_of_a_zero_probability_counts_nothing_and_margin_is_top1_minus_top2():
    probs = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.7, 0.0, 0.2], [0.0, 1.0, 0.0, 0.0]])
    assert entropy_nats(probs) == pytest.approx([1.5 * math.log(2), scipy_stats.entropy([0.1, 0.7, 0.2]), 0.0])
    assert probability_margin(probs) == pytest.approx([0.25, 0.5, 1.0])
    stats = token_statistics(probs)
    assert stats["router_entropy_norm"] == pytest.approx(stats["router_entropy"] / math.log(4))
    assert stats["router_entropy_norm"][0] == pytest.approx(0.75)  # 1.5 ln 2 / ln 4


def test_layer_histograms_put_each_token_in_its_bin():
    # token 0: uniform over 4 experts (normalised entropy 1, margin 0);
    # token 1: (0.7, 0.1, 0.1, 0.1): entropy 0.940 nats, 0.678 normalised, margin 0.6
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    assert scipy_stats.entropy(probs[1]) / math.log(4) == pytest.approx(0.678, abs=1e-3)
    table = layer_histograms(probs, bins=4)
    norm = table[table["statistic"] == "router_entropy_norm"]
    assert norm[["bin_low", "bin_high", "count"]].values.tolist() == [[0.5, 0.75, 1], [0.75, 1.0, 1]]
    margin = table[table["statistic"] == "top1_margin"]
    assert margin[["bin_low", "bin_high", "count"]].values.tolist() == [[0.0, 0.25, 1], [0.5, 0.75, 1]]
    nats = table[table["statistic"] == "router_entropy"]
    assert nats["bin_high"].max() == pytest.approx(math.log(4)) and nats["count"].tolist() == [1, 1]


def test_histogram_quantiles_interpolate_within_bins_and_skip_gaps():
    # counts 1 and 3 in [0, 1) and [1, 2): the median is a third of the way into the second bin
    assert histogram_quantiles([0, 1], [1, 2], [1, 3], [0.25, 0.5, 1.0]) == pytest.approx([1.0, 4 / 3, 2.0])
    # empty bins left out: [0, 1] and [3, 4] with 2 each; nothing lies in the gap (1, 3)
    assert histogram_quantiles([0, 3], [1, 4], [2, 2], [0.25, 0.75]) == pytest.approx([0.5, 3.5])
    assert np.isnan(histogram_quantiles([0], [1], [0], [0.5])).all()


def test_histogram_quantiles_approach_numpys_quantiles_of_the_values():
    values = np.random.default_rng(0).beta(8, 2, size=20_000)
    counts, edges = np.histogram(values, bins=500, range=(0, 1))
    kept = counts > 0
    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
    estimate = histogram_quantiles(edges[:-1][kept], edges[1:][kept], counts[kept], quantiles)
    assert estimate == pytest.approx(np.quantile(values, quantiles), abs=2e-3)  # one bin width


def write_run(run_dir, routing, dataset, layers, logits, num_experts=4, **summary):
    """A run directory with the summary.json and decisions.parquet (layer, logits and a few other columns)."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"routing": routing, "dataset": dataset,
                                                      "num_experts": num_experts, "num_layers": 2, **summary}))
    table = pa.table({"doc_id": pa.array(range(len(layers)), pa.int32()), "layer": pa.array(layers, pa.int16()),
                      "logits": pa.array([list(map(float, row)) for row in logits], pa.list_(pa.float32())),
                      "selected": pa.array([[0]] * len(layers), pa.list_(pa.int16()))})
    pq.write_table(table, run_dir / "decisions.parquet")
    return run_dir


def test_collect_router_diagnostics_reads_each_file_once_and_counts_every_sampled_token(tmp_path, monkeypatch):
    uniform, peaked = [0.0, 0.0, 0.0, 0.0], np.log([0.5, 0.25, 0.25, 1e-12]).tolist()
    first = write_run(tmp_path / "a", "topk2", "code", [0, 1, 0], [uniform, peaked, peaked])
    second = write_run(tmp_path / "b", "bh", "code", [1], [uniform])
    reads = []
    original = pq.read_table
    monkeypatch.setattr(diagnostics.pq, "read_table",
                        lambda path, **kwargs: reads.append((path, kwargs)) or original(path, **kwargs))
    table = collect_router_diagnostics([first, second], bins=4)
    assert [sorted(kwargs["columns"]) for _, kwargs in reads] == [["layer", "logits"]] * 2
    assert list(table.columns) == ["routing", "dataset", "layer", "statistic", "bin_low", "bin_high", "count"]
    assert table.groupby(["routing", "layer", "statistic"])["count"].sum().to_dict() == {
        **{("bh", 1, s): 1 for s in ("router_entropy", "router_entropy_norm", "top1_margin")},
        **{("topk2", 0, s): 2 for s in ("router_entropy", "router_entropy_norm", "top1_margin")},
        **{("topk2", 1, s): 1 for s in ("router_entropy", "router_entropy_norm", "top1_margin")}}
    margins = table[(table["routing"] == "topk2") & (table["layer"] == 0) & (table["statistic"] == "top1_margin")]
    # layer 0: a uniform token (margin 0) and a peaked one (margin 0.25)
    assert margins[["bin_low", "count"]].values.tolist() == [[0.0, 1], [0.25, 1]]
    assert list(table["routing"]) == sorted(table["routing"])


def test_collect_router_diagnostics_skips_unsampled_runs_and_rejects_bad_input(tmp_path):
    empty = write_run(tmp_path / "a", "topk2", "code", [], [])
    table = collect_router_diagnostics([empty])
    assert table.empty and list(table.columns) == list(diagnostics.COLUMNS)
    wrong = write_run(tmp_path / "b", "topk2", "wiki", [0], [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="length \\[3\\].*4 experts"):
        collect_router_diagnostics([wrong])
    with pytest.raises(ValueError, match="run_dirs is empty"):
        collect_router_diagnostics([])
    with pytest.raises(ValueError, match="score: 'relu'"):
        collect_router_diagnostics([empty], score="relu")


def test_pooled_quantiles_count_each_datasets_tokens_once():
    table = pd.DataFrame({"routing": "topk8", "dataset": ["code", "code", "wiki"], "layer": 0,
                          "statistic": "top1_margin", "bin_low": [0.0, 0.5, 0.5], "bin_high": [0.5, 1.0, 1.0],
                          "count": [2, 1, 1]})
    quantiles = pooled_quantiles(table, quantiles=[0.25, 0.5, 0.75])
    # pooled: 2 tokens in [0, 0.5), 2 in [0.5, 1]
    assert quantiles["value"].tolist() == pytest.approx([0.25, 0.5, 0.75])
    assert list(quantiles.columns) == ["routing", "layer", "statistic", "quantile", "value"]


def test_each_run_is_read_with_its_own_router_score(tmp_path):
    """A sigmoid family's run (summary.json router_score) is read as normalised sigmoid scores: logits
    (0, 0, ln 3, -inf) are probabilities (1/2, 1/2, 3/4, 0) / 1.75 = (2/7, 2/7, 3/7, 0), top-1 margin 1/7;
    the softmax of the same logits is (1/5, 1/5, 3/5, 0), margin 2/5."""
    logits = [[0.0, 0.0, float(np.log(3.0)), -1e9]]
    sigmoid = write_run(tmp_path / "s", "topk2", "code", [0], logits, router_score="sigmoid")
    softmax = write_run(tmp_path / "o", "topk2", "wiki", [0], logits)  # written before router_score: softmax
    table = collect_router_diagnostics([sigmoid, softmax], bins=1000)
    margins = table[table["statistic"] == "top1_margin"].set_index("dataset")["bin_low"]
    assert margins["code"] == pytest.approx(1 / 7, abs=1e-3) and margins["wiki"] == pytest.approx(2 / 5, abs=1e-3)
    assert collect_router_diagnostics([sigmoid], score="softmax").equals(
        collect_router_diagnostics([softmax], score="softmax").assign(dataset="code"))  # an explicit score rules
    bad = write_run(tmp_path / "b", "topk2", "code", [0], logits, router_score="relu")
    with pytest.raises(ValueError, match="score: 'relu' is not valid"):
        collect_router_diagnostics([bad])
