"""Tidy tables across runs: one row per (routing, dataset) run, or per (run, layer).

A run directory (``results/{experiment}/runs/{routing}/{dataset}``) holds ``summary.json``
(routing statistics) and ``metrics.json`` (quality metrics), both written by the route stage.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from .config import ROUTING_PARAMS

from routelab.io import read_json

# Routing parameters, one column each; NaN where a method does not have the parameter.
# Non-scalar entries of summary.json; per_layer goes to collect_layers, the rest to the plots.
SUMMARY_COLLECTIONS = ("per_layer", "k_histogram", "expert_counts", "top1_counts")
RUN_KEYS = ("routing", "dataset", "method")


def read_run_file(run_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """``run_dir/name`` parsed as JSON; FileNotFoundError naming the path when it is missing."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"run file missing: {path}")
    return read_json(path)


def _scalars(record: dict[str, Any], skip: Iterable[str]) -> dict[str, Any]:
    skip = set(skip)
    return {key: value for key, value in record.items()
            if key not in skip and not isinstance(value, (list, dict))}


def _check_same_run(summary: dict[str, Any], metrics: dict[str, Any], run_dir: str | os.PathLike) -> None:
    for key in ("routing", "dataset"):
        if summary.get(key) != metrics.get(key):
            raise ValueError(f"{run_dir}: summary.json has {key}={summary.get(key)!r} but "
                             f"metrics.json has {key}={metrics.get(key)!r}")


def run_record(summary: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """One flat row from a run's summary and metrics.

    The routing parameters come from ``summary["params"]``. summary.json's own ``min_k`` / ``max_k``
    (the bounds its floor and ceiling rates refer to; both equal k for top-k) are left out so that
    those columns mean the configured parameters.
    """
    params = summary.get("params") or {}
    row: dict[str, Any] = {key: summary[key] for key in RUN_KEYS}
    row.update({name: params.get(name) for name in ROUTING_PARAMS})
    row["task"] = metrics.get("task")
    row.update(_scalars(metrics, skip=(*RUN_KEYS, "task")))
    row.update(_scalars(summary, skip=(*RUN_KEYS, *ROUTING_PARAMS, *SUMMARY_COLLECTIONS, "params")))
    return row


def collect_runs(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run directory: run keys, routing parameters, task, scalar quality metrics and
    scalar routing statistics (rates in %), sorted by routing, dataset."""
    rows = []
    for run_dir in run_dirs:
        summary = read_run_file(run_dir, "summary.json")
        metrics = read_run_file(run_dir, "metrics.json")
        _check_same_run(summary, metrics, run_dir)
        row = run_record(summary, metrics)
        system_file = Path(run_dir) / "system.json"  # speed and memory, when the route stage wrote them
        if system_file.is_file():
            row.update(_scalars(read_json(system_file), skip=RUN_KEYS))
        rows.append(row)
    if not rows:
        raise ValueError("run_dirs is empty: no runs to collect")
    table = pd.DataFrame(rows)
    _check_unique(table, ["routing", "dataset"])
    return table.sort_values(["routing", "dataset"], ignore_index=True)


def collect_layers(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (run, layer): routing, dataset, method, layer and that layer's statistics
    (decisions, experts_mean, experts_std, ..., ceiling_hit_rate, floor_hit_rate in %)."""
    rows = []
    for run_dir in run_dirs:
        summary = read_run_file(run_dir, "summary.json")
        keys = {key: summary[key] for key in RUN_KEYS}
        rows.extend({**keys, **layer} for layer in summary["per_layer"])
    if not rows:
        raise ValueError("run_dirs is empty (or their summaries have no per_layer entries)")
    table = pd.DataFrame(rows)
    _check_unique(table, ["routing", "dataset", "layer"])
    return table.sort_values(["routing", "dataset", "layer"], ignore_index=True)


def _check_unique(table: pd.DataFrame, keys: list[str]) -> None:
    duplicated = table[table.duplicated(keys, keep=False)]
    if not duplicated.empty:
        raise ValueError(f"the same {tuple(keys)} appears in more than one run directory: "
                         f"{duplicated[keys].drop_duplicates().to_dict('records')}")
