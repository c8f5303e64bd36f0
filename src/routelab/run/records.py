"""A run's records assembled from its parts (the chunks of a checkpointed run, or the shards of a sharded
one) by the same functions, so the two paths cannot drift apart:

- Parquet logs (``routing.parquet``, ``decisions.parquet``): concatenated in part order
  (:func:`routelab.io.parquet.concat_parquet`);
- ``summary.json``: from the parts' recorder states summed (:func:`routelab.record.statistics.merge_states`),
  never from averaged averages (:func:`run_summary`);
- ``metrics.json``: recomputed from the concatenated per-document scores (:func:`run_metrics`);
- ``system.json``: wall time summed, peak memory maxed (:func:`merge_system`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from routelab.io.files import read_json, write_json, write_parquet
from routelab.io.parquet import concat_parquet
from routelab.record.statistics import merge_states, summary_from_state
from routelab.run.quality import quality_metrics
from routelab.run.shards import check_parts
from routelab.tracking import log_routing_run

log = logging.getLogger(__name__)


def run_summary(head: dict[str, Any], state: dict[str, np.ndarray], min_k: int, max_k: int,
                expert_flops_per_selection: float) -> dict[str, Any]:
    """``summary.json``: the run's ``head`` (routing, dataset, method, params, model shape) and the
    routing statistics of the recorder ``state``, plus active expert FLOPs per token.

    ``head`` must hold ``num_layers`` and ``model_top_k``; FLOPs count per selected expert per token.
    """
    summary = {**head, **summary_from_state(state, min_k, max_k)}
    summary["active_expert_flops_per_token"] = expert_flops_per_selection * summary["experts_mean"] * head["num_layers"]
    summary["active_expert_flops_vs_topk"] = summary["experts_mean"] / head["model_top_k"]
    return summary


def run_metrics(routing: str, dataset: str, task: str, scores: pd.DataFrame) -> dict[str, Any]:
    """``metrics.json`` from the run's per-document scores (all documents of the dataset)."""
    return {"routing": routing, "dataset": dataset, "task": task, **quality_metrics(scores, task)}


# The recorders' logs of a run (each part of a chunked or sharded run writes them; the run's are their
# concatenation in order): every decision, every n-th token's detail, the explorer's documents' detail.
ROUTING_LOGS = ("routing.parquet", "decisions.parquet", "explorer.parquet")
RUN_LOGS = ("metrics.json", "summary.json", *ROUTING_LOGS, "scores.parquet")


def write_run_records(out: str | os.PathLike, *, summary: dict[str, Any], provenance: dict[str, Any],
                      system: dict[str, Any], metrics: dict[str, Any], k_hist: np.ndarray) -> None:
    """Write a finished run's JSON records into ``out`` (atomically, each) and its ``tracking/`` files
    (hyperparameters, per-layer statistics, histograms, system, artifacts) that the export_tracking rule
    replays into TensorBoard / MLflow. ``k_hist`` is the recorder's experts-selected histogram per layer."""
    out = Path(out)
    write_json(out / "summary.json", summary)
    write_json(out / "provenance.json", provenance)
    write_json(out / "system.json", system)
    write_json(out / "metrics.json", metrics)
    log_routing_run(out / "tracking", provenance, metrics, summary, system, k_hist=k_hist,
                    artifacts={name: out / name for name in RUN_LOGS})


def merge_system(systems: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``system.json`` of a sharded run: compute time summed over shards (seconds), throughput over the
    summed time (tokens/s), peak memory the largest of any shard (MB), devices and kernels listed once each."""
    wall = sum(s["wall_time_s"] for s in systems)
    tokens = sum(s["tokens_per_s"] * s["wall_time_s"] for s in systems)
    cuda = [s["peak_cuda_mb"] for s in systems if s.get("peak_cuda_mb") is not None]

    def distinct(key: str) -> Any:
        values = list(dict.fromkeys(s[key] for s in systems))
        return values[0] if len(values) == 1 else ", ".join(map(str, values))

    return {"routing": systems[0]["routing"], "dataset": systems[0]["dataset"], "wall_time_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "peak_rss_mb": max(s["peak_rss_mb"] for s in systems), "peak_cuda_mb": max(cuda) if cuda else None,
            "device": distinct("device"), "experts_implementation": distinct("experts_implementation"),
            "shards": len(systems)}


def gather_shards(part_dirs: Sequence[str | os.PathLike], data: str | os.PathLike, out: str | os.PathLike) -> None:
    """Stage gather_shards: merge the shards of one run (their directories, in shard order) into the files an
    unsharded route job writes into ``out``; ``data`` is the prepared dataset (its info.json counts the windows).

    Provenance is shard 1's, plus each shard's documents, windows and batch size."""
    dirs = [Path(p) for p in part_dirs]
    parts = [read_json(d / "part.json") for d in dirs]
    info = read_json(Path(data) / "info.json")
    check_parts(parts, info["windows"])
    first, head = parts[0], parts[0]["summary_head"]
    out = Path(out)
    for name in ROUTING_LOGS:
        concat_parquet([d / name for d in dirs], out / name)
    scores = pd.concat([pd.read_parquet(d / "scores.parquet") for d in dirs], ignore_index=True)
    write_parquet(out / "scores.parquet", scores)
    state = merge_states([_load_state(d / "accumulators.npz") for d in dirs])
    summary = run_summary(head, state, first["min_k"], first["max_k"], first["expert_flops_per_selection"])
    metrics = run_metrics(head["routing"], head["dataset"], first["task"], scores)
    system = merge_system([p["system"] for p in parts])
    provenance = {**first["provenance"],
                  "shards": [{"shard": p["shard"], "documents": p["documents"], "windows": p["windows"],
                              "batch_size": p["provenance"]["batch_size"]} for p in parts]}
    write_run_records(out, summary=summary, provenance=provenance, system=system, metrics=metrics,
                      k_hist=state["k_hist"])
    log.info("merged %d shards: %d documents; metrics %s", len(parts), len(scores), metrics)


def _load_state(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}
