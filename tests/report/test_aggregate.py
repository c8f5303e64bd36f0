"""The aggregate stage: tidy tables across run directories."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from routelab.io.files import write_parquet
from routelab.report.aggregate import (
    coactivation_counts,
    collect_coactivation,
    collect_expert_counts,
    collect_layers,
    collect_runs,
    collect_scores,
    parameter_columns,
    parameter_value,
)
from tests.support.report_runs import (
    document_scores,
    routing_log,
    write_runs,
)


def test_collect_runs_gives_one_flat_row_per_run(tmp_path):
    runs = collect_runs(write_runs(tmp_path))
    assert len(runs) == 6
    first = ["routing", "dataset", "method", "k", "alpha", "min_k", "max_k", "temperature", "weights", "p", "alpha0",
             "null_model"]
    others = [name for name in parameter_columns() if name not in first]  # the other rules' parameters
    assert others and list(runs.columns[: len(first) + len(others) + 1]) == [*first, *others, "task"]
    assert list(zip(runs["routing"], runs["dataset"])) == sorted(zip(runs["routing"], runs["dataset"]))
    topk = runs[runs["routing"] == "topk8"].iloc[0]
    assert topk["k"] == 8 and pd.isna(topk["alpha"]) and pd.isna(topk["min_k"]) and pd.isna(topk["max_k"])
    bh = runs[(runs["routing"] == "bh_a0.2_k4") & (runs["dataset"] == "lambada")].iloc[0]
    assert (bh["alpha"], bh["min_k"], bh["max_k"], bh["task"]) == (0.2, 2, 4, "cloze")
    assert bh["acc"] == pytest.approx(3.2) and bh["ceiling_hit_rate"] == 30.0
    assert pd.isna(runs[runs["dataset"] == "lambada"]["bits_per_byte"]).all()
    assert {"tokens_per_s", "pvalue_mean", "total_decisions", "num_experts"} <= set(runs.columns)
    assert not {"per_layer", "k_histogram", "expert_counts", "params"} & set(runs.columns)


def test_collect_runs_names_the_missing_file(tmp_path):
    run_dirs = write_runs(tmp_path)
    (run_dirs[0] / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(run_dirs[0] / "metrics.json"))):
        collect_runs(run_dirs)
    with pytest.raises(ValueError, match="run_dirs is empty"):
        collect_runs([])


def test_collect_layers_gives_one_row_per_run_and_layer(tmp_path):
    layers = collect_layers(write_runs(tmp_path))
    assert len(layers) == 12
    assert list(layers.columns[:4]) == ["routing", "dataset", "method", "layer"]
    bh = layers[(layers["routing"] == "bh_a0.05_k8") & (layers["dataset"] == "wiki")]
    assert bh["layer"].tolist() == [0, 1]
    assert bh["experts_mean"].tolist() == pytest.approx([0.6 + 0.4 * 8, 0.8 + 0.2 * 8])
    assert bh["ceiling_hit_rate"].tolist() == [40.0, 20.0]


def test_collect_scores_gathers_every_runs_documents(tmp_path):
    scores = collect_scores(write_runs(tmp_path))
    assert len(scores) == 6 * 12
    assert list(scores.columns) == ["routing", "dataset", "doc_id", "loglik", "tokens", "correct", "words", "bytes"]
    bh = scores[(scores["routing"] == "bh_a0.05_k8") & (scores["dataset"] == "wiki")]
    assert bh["loglik"].to_numpy() == pytest.approx(document_scores(1)["loglik"].to_numpy())


def test_collect_expert_counts_unrolls_summary_counts(tmp_path):
    counts = collect_expert_counts(write_runs(tmp_path))
    assert len(counts) == 6 * 2 * 4
    run = counts[(counts["routing"] == "topk8") & (counts["dataset"] == "wiki")]
    assert run["count"].tolist() == [50, 30, 20, 60, 40, 40, 10, 30]
    assert run["layer"].tolist() == [0] * 4 + [1] * 4 and (run["decisions"] == 100).all()


def test_coactivation_counts_match_a_hand_count(tmp_path):
    path = tmp_path / "routing.parquet"
    write_parquet(path, routing_log("topk", [0, 1]))
    # layer 1, per document: {0, 1}, {1, 2}, {0, 1, 3}; two documents
    expected = 2 * np.array([[2, 2, 0, 1], [2, 3, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]])
    assert coactivation_counts(path, layer=1, num_experts=4).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="no routing decisions in layer 7"):
        coactivation_counts(path, layer=7, num_experts=4)


def test_collect_coactivation_uses_the_middle_layer_by_default(tmp_path):
    run_dirs = write_runs(tmp_path)
    table = collect_coactivation(run_dirs)
    assert (table["layer"] == 1).all()  # 2 layers: the middle one is 2 // 2
    bh = table[(table["routing"] == "bh_a0.05_k8") & (table["dataset"] == "wiki")]
    # BH layer 1 per document: {0, 1}, {1}, {3}
    assert sorted(zip(bh["expert"], bh["other"], bh["count"])) == [
        (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 4), (3, 3, 2)]
    assert (collect_coactivation(run_dirs, layer=0)["layer"] == 0).all()
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        collect_coactivation(run_dirs, layer=5)


def test_list_valued_and_fitted_parameters_are_compact_text_cells(tmp_path):
    # A per-layer k list, a calibrated rule's fitted values per layer (a list of lists) and the same
    # parameter as a number in another run: one text column each, readable and writable to Parquet.
    assert parameter_value([6, 7, 6, 5]) == "[6,7,6,5]"
    assert parameter_value([[3.912114977, 3.98405], [4.0, 4.1]]) == "[[3.912,3.984],[4.0,4.1]]"
    assert parameter_value(0.25) == 0.25 and parameter_value(None) is None


def test_a_parameter_that_is_a_number_in_one_run_and_fitted_per_layer_in_another_is_text(tmp_path):
    import json

    for name, beta in (("ratio_fixed", 0.4), ("ratio_median", [0.64112, 0.80735])):
        run = tmp_path / name / "code"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"routing": name, "dataset": "code", "method": "ratio",
                                                      "params": {"beta": beta, "min_k": 1, "max_k": 8}}))
        (run / "metrics.json").write_text(json.dumps({"routing": name, "dataset": "code", "task": "perplexity"}))
    runs = collect_runs([tmp_path / "ratio_fixed" / "code", tmp_path / "ratio_median" / "code"])
    assert runs["beta"].tolist() == ["0.4", "[0.6411,0.8074]"]
    runs.to_parquet(tmp_path / "runs.parquet")  # one type per column: Parquet takes it
