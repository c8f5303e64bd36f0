"""The sampled detail as the JSON routing logs researchers read (``decisions_detailed.json``,
``decisions_summary.json``), from a run's ``decisions.parquet`` and ``summary.json``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def _stats(values: list[float] | None) -> dict[str, float] | None:
    """mean / population std / min / max of one row's list, or ``None`` for a null list."""
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()),
            "max": float(array.max())}


def decision_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One ``decisions.parquet`` row as an entry of the detailed JSON log."""
    return {
        "layer": row["layer"], "token_position": row["position"], "window_id": row["window_id"],
        "token_id": row["token_id"],
        "logits_stats": {"mean": row["logit_mean"], "std": row["logit_std"], "min": row["logit_min"],
                         "max": row["logit_max"]},
        "pvalues_stats": _stats(row["pvalues"]),
        "bh_results": {"sorted_pvalues": row["sorted_pvalues"], "thresholds": row["bh_thresholds"],
                       "passing_rank": row["passing_rank"], "selected_experts": row["selected"],
                       "num_selected": row["k"]},
    }


def detailed_log(decisions: pa.Table, experiment_name: str, config: dict[str, Any], total_decisions: int,
                 timestamp: str) -> dict[str, Any]:
    """The detailed JSON log: header plus one entry per sampled (token, layer) decision."""
    return {"experiment_name": experiment_name, "config": config, "timestamp": timestamp,
            "total_decisions": total_decisions, "entries": [decision_entry(row) for row in decisions.to_pylist()]}


def summary_log(summary: dict[str, Any], sampled_decisions: int, experiment_name: str, config: dict[str, Any],
                timestamp: str) -> dict[str, Any]:
    """The summary JSON log, from a run's ``summary.json`` (all decisions) and the sample size."""
    return {"experiment_name": experiment_name, "config": config, "timestamp": timestamp,
            "total_decisions": summary["total_decisions"], "sampled_decisions": sampled_decisions,
            "avg_experts": summary["experts_mean"], "std_experts": summary["experts_std"],
            "min_experts": summary["experts_min"], "max_experts": summary["experts_max"],
            "ceiling_hit_rate": summary["ceiling_hit_rate"], "floor_hit_rate": summary["floor_hit_rate"],
            "pvalue_mean": summary["pvalue_mean"], "pvalue_std": summary["pvalue_std"]}
