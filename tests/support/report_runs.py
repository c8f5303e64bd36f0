"""Hand-made run directories in the route stage's format, aggregated: the input of the report tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from routelab.io.files import write_json, write_parquet
from routelab.report.aggregate import (
    collect_coactivation,
    collect_expert_counts,
    collect_runs,
    collect_scores,
)
from routelab.report.diagnostics import collect_router_diagnostics
from routelab.report.routing_analyses import collect_routing_analyses

TOPK = ("topk8", "topk", {"k": 8, "weights": "model"}, 8, 8)


BH = ("bh_a0.05_k8", "bh", {"alpha": 0.05, "min_k": 1, "max_k": 8, "temperature": 1.0, "weights": "model"}, 1, 8)


BH_LOOSE = ("bh_a0.2_k4", "bh", {"alpha": 0.2, "min_k": 2, "max_k": 4, "temperature": 1.0, "weights": "model"}, 2, 4)


def summary(routing: str, dataset: str, method: str, params: dict, min_k: int, max_k: int) -> dict:
    """A summary.json in the route stage's format: 2 layers, 4 experts."""
    k_per_layer = [{min_k: 60, max_k: 40}, {min_k: 80, max_k: 20}] if method == "bh" else [{8: 100}, {8: 100}]
    per_layer = []
    for layer, hist in enumerate(k_per_layer):
        ks, counts = np.array(list(hist)), np.array(list(hist.values()))
        mean = float((ks * counts).sum() / counts.sum())
        per_layer.append({"layer": layer, "decisions": 100, "experts_mean": mean, "experts_std": 1.0,
                          "experts_median": float(ks[0]), "experts_min": int(ks.min()),
                          "experts_max": int(ks.max()), "ceiling_hit_rate": float(hist.get(max_k, 0)),
                          "floor_hit_rate": float(hist.get(min_k, 0))})
    k_histogram = {}
    for hist in k_per_layer:
        for k, count in hist.items():
            k_histogram[str(k)] = k_histogram.get(str(k), 0) + count
    experts_mean = float(np.mean([layer["experts_mean"] for layer in per_layer]))
    is_bh = method == "bh"
    return {"routing": routing, "dataset": dataset, "method": method, "params": params,
            "num_layers": 2, "num_experts": 4, "model_top_k": 8, "total_decisions": 200,
            "experts_mean": experts_mean, "experts_std": 1.0, "experts_median": float(min_k),
            "experts_min": min_k, "experts_max": max_k, "min_k": min_k, "max_k": max_k,
            "ceiling_hit_rate": 30.0 if is_bh else 100.0, "floor_hit_rate": 70.0 if is_bh else 100.0,
            "pvalue_mean": 0.4 if is_bh else None, "pvalue_std": 0.3 if is_bh else None,
            "selected_pvalue_mean": 0.001 if is_bh else None, "per_layer": per_layer,
            "k_histogram": k_histogram, "expert_counts": [[50, 30, 20, 60], [40, 40, 10, 30]],
            "active_expert_flops_per_token": 1000.0 * experts_mean, "active_expert_flops_vs_topk": experts_mean / 8}


def metrics(routing: str, dataset: str, task: str, quality: float) -> dict:
    task_metrics = ({"acc": quality, "cloze_perplexity": 4.1} if task == "cloze" else
                    {"word_perplexity": 8.1, "byte_perplexity": 1.4, "bits_per_byte": 0.5})
    return {"routing": routing, "dataset": dataset, "task": task, "documents": 10, "tokens": 300,
            "nll_per_token": 1.2, "perplexity": quality if task == "perplexity" else 5.0, **task_metrics,
            "wall_time_s": 2.0, "tokens_per_s": 150.0, "device": "cpu"}


def routing_log(method: str, doc_ids: list[int]) -> pd.DataFrame:
    """A routing.parquet for 2 layers x 4 experts: each document has 3 tokens; layer 1 routes token 0
    to experts [0, 1], token 1 to [1, 2] (or [1] for BH) and token 2 to [0, 1, 3] (or [3])."""
    rows = []
    layer1 = ([[0, 1], [1, 2], [0, 1, 3]] if method != "bh" else [[0, 1], [1], [3]])
    for doc in doc_ids:
        for position, experts in enumerate(layer1):
            for layer, chosen in ((0, [position % 4]), (1, experts)):
                rows.append({"window_id": doc, "doc_id": doc, "position": position, "token_id": 5 + position,
                             "layer": layer, "k": len(chosen), "experts": chosen,
                             "weights": [1.0 / len(chosen)] * len(chosen)})
    table = pd.DataFrame(rows)
    schema = pa.schema([("window_id", pa.int32()), ("doc_id", pa.int32()), ("position", pa.int32()),
                        ("token_id", pa.int32()), ("layer", pa.int16()), ("k", pa.int16()),
                        ("experts", pa.list_(pa.int16())), ("weights", pa.list_(pa.float32()))])
    return pa.Table.from_pandas(table, schema=schema, preserve_index=False)


def document_scores(index: int, num_docs: int = 12) -> pd.DataFrame:
    """Per-document scores: the index-th routing loses 0.05 nats per token on every document."""
    tokens = np.arange(num_docs) + 10
    return pd.DataFrame({"doc_id": np.arange(num_docs), "loglik": -tokens * (1.0 + 0.05 * index),
                         "tokens": tokens, "correct": (np.arange(num_docs) + index) % 3 == 0,
                         "words": tokens, "bytes": 3 * tokens})


def sampled_logits(index: int) -> pd.DataFrame:
    """The columns of decisions.parquet the router diagnostics read: 3 sampled tokens x 2 layers, 4 experts."""
    rows = [{"window_id": 0, "doc_id": 0, "position": token, "token_id": 5 + token, "layer": layer,
             "logits": [float(token + layer), 0.5 * index, 0.0, -1.0]} for token in range(3) for layer in range(2)]
    return pd.DataFrame(rows)


def write_runs(root: Path, routings=(TOPK, BH, BH_LOOSE),
               datasets=(("wiki", "perplexity"), ("lambada", "cloze"))) -> list[Path]:
    """Run directories root/runs/{routing}/{dataset} with summary.json, metrics.json, system.json,
    scores.parquet, routing.parquet and (the router logits of) decisions.parquet."""
    run_dirs = []
    for index, (routing, method, params, min_k, max_k) in enumerate(routings):
        for dataset, task in datasets:
            run_dir = root / "runs" / routing / dataset
            write_json(run_dir / "summary.json", summary(routing, dataset, method, params, min_k, max_k))
            write_json(run_dir / "metrics.json", metrics(routing, dataset, task, 3.0 + index / 10))
            write_json(run_dir / "system.json", {"routing": routing, "dataset": dataset, "wall_time_s": 2.0 + index,
                                                 "tokens_per_s": 150.0 - 10 * index, "peak_rss_mb": 500.0 + index,
                                                 "peak_cuda_mb": None, "device": "cpu"})
            write_parquet(run_dir / "scores.parquet", document_scores(index))
            write_parquet(run_dir / "routing.parquet", routing_log(method, [0, 1]))
            write_parquet(run_dir / "decisions.parquet", sampled_logits(index))
            run_dirs.append(run_dir)
    return run_dirs[::-1]  # not in sorted order


def aggregate(root: Path) -> dict[str, pd.DataFrame]:
    run_dirs = write_runs(root)
    analyses = {**collect_routing_analyses(run_dirs, "topk8"),
                "router_diagnostics": collect_router_diagnostics(run_dirs)}
    return {"runs": collect_runs(run_dirs), "scores": collect_scores(run_dirs),
            "expert_counts": collect_expert_counts(run_dirs), "coactivation": collect_coactivation(run_dirs),
            "analyses": analyses}


def write_plot_index(plots_root: Path) -> None:
    """Per-run figures as plot_run leaves them: one run with index.json, one with PNGs only."""
    indexed = plots_root / "bh_a0.05_k8" / "wiki"
    write_json(indexed / "index.json", [
        {"file": "experts_histogram.png", "title": "Experts selected", "drawn": True},
        {"file": "bh_decisions.png", "title": "BH step-up", "drawn": True},
        {"file": "pvalue_distribution.png", "title": "P-values", "drawn": False, "reason": "n/a"}])
    globbed = plots_root / "topk8" / "wiki"
    globbed.mkdir(parents=True)
    for name in ("zz_extra.png", "expert_heatmap.png"):
        (globbed / name).write_bytes(b"\x89PNG")


# The explorer's test data: every document reads "<script>alert(1)</script>" (token ids 5, 6, 7 of
# routing_log), so the page must show it as text.
TOKEN_TEXT = {5: "<script>", 6: "alert(1)", 7: "</script>"}


def fake_decode(ids) -> list[str]:
    """A decoder in the shape of :func:`routelab.report.tokens.load_decoder`'s: one string per id."""
    return [TOKEN_TEXT.get(int(i), f"<{int(i)}>") for i in ids]


# p-values by expert index of routing_log's BH tokens, layer 1 (layer 0: 0.01 at the chosen expert, 0.5
# elsewhere). At alpha 0.05 (thresholds 0.0125, 0.025, 0.0375, 0.05) they pass ranks 2, 1 and 1: the
# experts routing_log selects.
LAYER1_PVALUES = ([0.001, 0.02, 0.5, 0.9], [0.3, 0.004, 0.6, 0.2], [0.7, 0.8, 0.9, 0.01])
LAYER1_PASSING = (2, 1, 1)


def explorer_log(alpha: float, doc_ids: list[int], positions=(0, 1, 2)) -> pa.Table:
    """An explorer.parquet (decisions.parquet's schema) of routing_log's BH tokens at ``positions``."""
    from routelab.record.decisions import SCHEMA, bh_thresholds

    rows = []
    for doc in doc_ids:
        for position in positions:
            for layer in (0, 1):
                if layer == 0:
                    pvalues, rank = [0.01 if e == position % 4 else 0.5 for e in range(4)], 1
                else:
                    pvalues, rank = LAYER1_PVALUES[position], LAYER1_PASSING[position]
                rows.append({"window_id": doc, "doc_id": doc, "position": position, "token_id": 5 + position,
                             "phase": "prefill", "layer": layer, "k": 1, "logits": [0.0] * 4, "pvalues": pvalues,
                             "sorted_pvalues": sorted(pvalues), "bh_thresholds": bh_thresholds(4, alpha).tolist(),
                             "passing_rank": rank, "selected": [0], "selected_weights": [1.0]})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_explorer_logs(run_dirs: list[Path]) -> None:
    """explorer.parquet beside routing.parquet in every BH run (the others have no p-values)."""
    for run_dir in run_dirs:
        summary = pd.read_json(run_dir / "summary.json", typ="series")
        if summary["method"] == "bh":
            write_parquet(run_dir / "explorer.parquet", explorer_log(summary["params"]["alpha"], [0, 1]))
