"""A run directory's files become the arrays the per-run figures draw; every figure is written and indexed."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routelab.catalogue import RUN_FIGURES
from routelab.plot.run_figures import draw_run_figures, experts_per_token, read_decisions, sequence_weights, token_label
from routelab.record.decisions import SCHEMA as DECISIONS_SCHEMA
from routelab.record.routing_log import SCHEMA as ROUTING_SCHEMA

LAYERS, EXPERTS = 2, 4
# (window, position, token id, [(experts, weights) per layer])
TOKENS = [
    (0, 0, 10, [([1], [0.5]), ([2, 0], [0.4, 0.1])]),
    (0, 1, 11, [([3, 1], [0.3, 0.2]), ([0], [0.6])]),
    (0, 2, 10, [([1], [0.7]), ([2], [0.5])]),
    (1, 0, 12, [([0, 1, 2], [0.2, 0.2, 0.2]), ([3], [0.9])]),
]


def routing_rows():
    return [{"window_id": window, "doc_id": window, "position": position, "token_id": token, "phase": "prefill",
             "layer": layer,
             "k": len(experts), "experts": experts, "weights": weights}
            for window, position, token, layers in TOKENS for layer, (experts, weights) in enumerate(layers)]


def decision_rows(method: str):
    rows = []
    for window, position, token, layers in TOKENS[:2]:
        for layer, (experts, weights) in enumerate(layers):
            logits = np.linspace(-1, 1, EXPERTS) + layer
            pvalues = np.linspace(0.01, 0.9, EXPERTS)[::-1].copy()
            row = {"window_id": window, "doc_id": window, "position": position, "token_id": token,
                   "phase": "prefill", "layer": layer, "k": len(experts), "logit_mean": logits.mean(),
                   "logit_std": logits.std(),
                   "logit_min": logits.min(), "logit_max": logits.max(), "logits": logits.tolist(),
                   "pvalues": None, "sorted_pvalues": None, "bh_thresholds": None, "passing_rank": None,
                   "selected": experts, "selected_weights": weights}
            if method != "topk":
                row.update(pvalues=pvalues.tolist(), sorted_pvalues=np.sort(pvalues).tolist())
            if method == "bh":
                row.update(bh_thresholds=(np.arange(1, 5) * 0.5 / 4).tolist(), passing_rank=1)
            rows.append(row)
    return rows


def write_run(run_dir, method: str):
    run_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(routing_rows(), schema=ROUTING_SCHEMA), run_dir / "routing.parquet")
    pq.write_table(pa.Table.from_pylist(decision_rows(method), schema=DECISIONS_SCHEMA),
                   run_dir / "decisions.parquet")
    counts = np.zeros((LAYERS, EXPERTS), dtype=int)
    for *_, layers in TOKENS:
        for layer, (experts, _) in enumerate(layers):
            counts[layer, experts] += 1
    summary = {"routing": f"{method}_run", "dataset": "toy", "method": method,
               "params": {"alpha": 0.5} if method == "bh" else {}, "num_layers": LAYERS, "num_experts": EXPERTS,
               "min_k": 1, "max_k": 3, "k_histogram": {"1": 5, "2": 2, "3": 1},
               "expert_counts": counts.tolist(),
               "per_layer": [{"layer": 0, "decisions": 4}, {"layer": 1, "decisions": 4}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_sequence_weights_lays_out_the_first_window_densely(tmp_path):
    path = write_run(tmp_path / "run", "bh") / "routing.parquet"
    token_ids, layers, weights = sequence_weights(path, EXPERTS)
    assert list(token_ids) == [10, 11, 10] and list(layers) == [0, 1]
    expected = np.full((2, 3, 4), np.nan)
    for position, (*_, per_layer) in enumerate(TOKENS[:3]):
        for layer, (experts, values) in enumerate(per_layer):
            expected[layer, position, experts] = values
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    token_ids, _, weights = sequence_weights(path, EXPERTS, window_id=1)
    assert list(token_ids) == [12] and np.isnan(weights).sum() == 2 * 4 - 4


def test_experts_per_token_averages_k_over_layers_and_checks_row_order():
    token_id, layer, k = np.array([10, 10, 11, 11]), np.array([0, 1, 0, 1]), np.array([1, 2, 2, 1])
    ids, experts = experts_per_token(token_id, layer, k, num_layers=2)
    assert list(ids) == [10, 11] and list(experts) == [1.5, 1.5]
    with pytest.raises(ValueError, match="token-major"):
        experts_per_token(token_id, np.array([0, 0, 1, 1]), k, num_layers=2)


@pytest.mark.parametrize("method", ["bh", "topk"])
def test_read_decisions_returns_matrices_or_none_without_pvalues(tmp_path, method):
    decisions = read_decisions(write_run(tmp_path / "run", method) / "decisions.parquet")
    assert decisions["logits"].shape == (4, EXPERTS) and list(decisions["layer"]) == [0, 1, 0, 1]
    if method == "bh":
        assert decisions["pvalues"] == pytest.approx(np.tile(np.linspace(0.01, 0.9, 4)[::-1], (4, 1)))
        assert list(decisions["passing_rank"]) == [1, 1, 1, 1]
    else:
        assert decisions["pvalues"] is None and decisions["sorted_pvalues"] is None
        assert decisions["passing_rank"] is None


@pytest.mark.parametrize("method, not_drawn", [
    ("bh", set()),
    ("hc", {"bh_decisions.png", "bh_pass_rate.png"}),
    ("topk", {"pvalue_distribution.png", "logit_vs_pvalue.png", "bh_decisions.png", "bh_pass_rate.png"}),
])
def test_draw_run_figures_writes_every_figure_and_the_index(tmp_path, method, not_drawn):
    run_dir = write_run(tmp_path / "run", method)
    out_dir = tmp_path / "plots"
    index = draw_run_figures(run_dir, out_dir, decode=lambda token: f"t{token}")
    assert json.loads((out_dir / "index.json").read_text()) == index
    assert [entry["file"] for entry in index] == [figure.file for figure in RUN_FIGURES]
    assert [entry["title"] for entry in index] == [figure.title for figure in RUN_FIGURES]
    assert {entry["file"] for entry in index if not entry["drawn"]} == not_drawn
    assert all(entry["reason"] for entry in index if not entry["drawn"])
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*(f.file for f in RUN_FIGURES), "index.json"])
    assert all((out_dir / figure.file).read_bytes()[:4] == b"\x89PNG" for figure in RUN_FIGURES)


def test_token_label_makes_whitespace_visible():
    assert token_label(" the") == "·the" and token_label("\n") == "\\n" and token_label("") == "∅"
