"""Tidy tables across runs, so the report needs no run directories.

A run directory (``results/{experiment}/runs/{routing}/{dataset}``) holds ``summary.json``
(routing statistics), ``metrics.json`` (quality metrics), ``scores.parquet`` (per-document scores)
and ``routing.parquet`` (every routing decision), all written by the route stage. The tables: one
row per run (:func:`collect_runs`), per (run, layer) (:func:`collect_layers`), per (run, document)
(:func:`collect_scores`), per (run, layer, expert) (:func:`collect_expert_counts`) and per (run,
expert pair) of one layer (:func:`collect_coactivation`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from routelab.config import routing_parameters
from routelab.io.files import read_json

# Routing parameters, one column each (NaN where a rule does not have the parameter), in this order
# (the run table's columns, the comparison table's params): these first, as in earlier reports, then
# any other rule's parameters in registry order.
PARAMETER_ORDER = ("k", "alpha", "min_k", "max_k", "temperature", "weights", "p", "alpha0", "null_model")


def _share_threads(threads: int) -> None:
    """A worker's BLAS and arrow threads limited to its share of the cores: each library sizes its pool
    to the whole machine, so two workers on two cores would run four threads each."""
    threadpool_limits(threads)
    pa.set_cpu_count(threads)


def process_map(function: Callable[..., Any], *iterables: Iterable, workers: int, desc: str, unit: str) -> list:
    """``[function(*args) for args in zip(*iterables)]`` with a progress bar; with ``workers`` > 1 in that
    many processes, spawned rather than forked (a forked child can inherit a lock pyarrow's threads
    hold), each with its share of the cores' threads. ``function`` must be a module-level function."""
    calls = list(zip(*iterables))
    workers = max(1, int(workers))
    if workers == 1 or len(calls) <= 1:
        return [function(*args) for args in tqdm(calls, desc=desc, unit=unit)]
    processes = min(workers, len(calls))
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_share_threads,
                             initargs=(max(1, (os.cpu_count() or 1) // processes),)) as pool:
        return list(tqdm(pool.map(function, *zip(*calls)), total=len(calls), desc=desc, unit=unit))


def parameter_columns() -> tuple[str, ...]:
    """Every routing parameter, in :data:`PARAMETER_ORDER` then registry order."""
    known = routing_parameters()
    return (*(name for name in PARAMETER_ORDER if name in known),
            *(name for name in known if name not in PARAMETER_ORDER))


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


def parameter_value(value: Any) -> Any:
    """A routing parameter as one table cell: a list (a per-layer k, a calibrated rule's fitted values of
    every layer) as compact JSON text with 4 significant digits, anything else as it is."""
    def rounded(item: Any) -> Any:
        if isinstance(item, list):
            return [rounded(v) for v in item]
        return float(f"{item:.4g}") if isinstance(item, float) else item

    return json.dumps(rounded(value), separators=(",", ":")) if isinstance(value, list) else value


def run_record(summary: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """One flat row from a run's summary and metrics.

    The routing parameters come from ``summary["params"]``. summary.json's own ``min_k`` / ``max_k``
    (the bounds its floor and ceiling rates refer to; both equal k for top-k) are left out so that
    those columns mean the configured parameters.
    """
    params = summary.get("params") or {}
    row: dict[str, Any] = {key: summary[key] for key in RUN_KEYS}
    row.update({name: parameter_value(params.get(name)) for name in parameter_columns()})
    row["task"] = metrics.get("task")
    row.update(_scalars(metrics, skip=(*RUN_KEYS, "task")))
    row.update(_scalars(summary, skip=(*RUN_KEYS, *parameter_columns(), *SUMMARY_COLLECTIONS, "params")))
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
    for name in parameter_columns():  # one rule's number and another's fitted list: the column is text
        column = table[name]
        if column.map(lambda v: isinstance(v, str)).any() and column.map(lambda v: isinstance(v, Real)).any():
            table[name] = column.map(lambda v: v if v is None or isinstance(v, str) or pd.isna(v) else str(v))
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


def collect_scores(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (run, document): ``routing, dataset`` and the columns of the run's
    scores.parquet (``doc_id, loglik, tokens, correct, words, bytes``), the bootstrap unit of the
    report's confidence intervals. Sorted by routing, dataset, doc_id."""
    tables = []
    for run_dir in run_dirs:
        summary = read_run_file(run_dir, "summary.json")
        path = Path(run_dir) / "scores.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"run file missing: {path}")
        scores = pd.read_parquet(path)
        scores.insert(0, "dataset", summary["dataset"])
        scores.insert(0, "routing", summary["routing"])
        tables.append(scores)
    if not tables:
        raise ValueError("run_dirs is empty: no scores to collect")
    table = pd.concat(tables, ignore_index=True)
    _check_unique(table, ["routing", "dataset", "doc_id"])
    return table.sort_values(["routing", "dataset", "doc_id"], ignore_index=True)


def collect_expert_counts(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (run, layer, expert): ``routing, dataset, layer, expert, count`` (tokens routed
    to the expert, from summary.json's ``expert_counts [layers][experts]``) and ``decisions``
    (tokens routed in that layer). ``count / decisions`` is the share of the dataset's tokens that
    the expert processes in that layer."""
    rows = []
    for run_dir in run_dirs:
        summary = read_run_file(run_dir, "summary.json")
        counts = np.asarray(summary["expert_counts"], dtype=np.int64)
        decisions = {layer["layer"]: layer["decisions"] for layer in summary["per_layer"]}
        num_layers, num_experts = counts.shape
        rows.append(pd.DataFrame({
            "routing": summary["routing"], "dataset": summary["dataset"],
            "layer": np.repeat(np.arange(num_layers), num_experts),
            "expert": np.tile(np.arange(num_experts), num_layers),
            "count": counts.ravel(),
            "decisions": np.repeat([decisions[layer] for layer in range(num_layers)], num_experts)}))
    if not rows:
        raise ValueError("run_dirs is empty: no expert counts to collect")
    return pd.concat(rows, ignore_index=True).sort_values(["routing", "dataset", "layer", "expert"],
                                                          ignore_index=True)


def coactivation_counts(routing_file: str | os.PathLike, layer: int, num_experts: int) -> np.ndarray:
    """``[experts, experts]`` token counts of one layer: cell (i, j) = tokens that selected both i
    and j; the diagonal = tokens that selected i. Reads only the ``experts`` column of that layer's
    rows of routing.parquet (a row-group filter), so a large log costs little memory."""
    table = pq.read_table(routing_file, columns=["experts"], filters=[("layer", "==", layer)])
    experts = table.column("experts").combine_chunks()
    if len(experts) == 0:
        raise ValueError(f"{routing_file} has no routing decisions in layer {layer}")
    offsets = experts.offsets.to_numpy()
    selected = experts.flatten().to_numpy().astype(np.int64)
    if selected.size and (selected.min() < 0 or selected.max() >= num_experts):
        raise ValueError(f"{routing_file}: expert index outside [0, {num_experts})")
    tokens = np.repeat(np.arange(len(experts)), np.diff(offsets))
    onehot = sparse.csr_matrix((np.ones(selected.size, dtype=np.int64), (tokens, selected)),
                               shape=(len(experts), num_experts))
    return (onehot.T @ onehot).toarray()


def default_layer(num_layers: int) -> int:
    """The layer the report analyses when none is configured: the middle one."""
    return num_layers // 2


def collect_coactivation(run_dirs: Iterable[str | os.PathLike], layer: int | None = None) -> pd.DataFrame:
    """Expert co-activation of every run in one MoE ``layer`` (None: the middle layer), as the
    non-zero cells ``routing, dataset, layer, expert, other, count`` of :func:`coactivation_counts`
    (``expert == other``: tokens that selected the expert)."""
    rows = []
    for run_dir in run_dirs:
        summary = read_run_file(run_dir, "summary.json")
        num_layers = int(summary["num_layers"])
        chosen = default_layer(num_layers) if layer is None else layer
        if not 0 <= chosen < num_layers:
            raise ValueError(f"layer {chosen} does not exist; the model has layers 0..{num_layers - 1}")
        routing_file = Path(run_dir) / "routing.parquet"
        if not routing_file.is_file():
            raise FileNotFoundError(f"run file missing: {routing_file}")
        counts = coactivation_counts(routing_file, chosen, int(summary["num_experts"]))
        expert, other = np.nonzero(counts)
        rows.append(pd.DataFrame({"routing": summary["routing"], "dataset": summary["dataset"],
                                  "layer": chosen, "expert": expert, "other": other,
                                  "count": counts[expert, other]}))
    if not rows:
        raise ValueError("run_dirs is empty: no routing logs to read")
    return pd.concat(rows, ignore_index=True).sort_values(["routing", "dataset", "expert", "other"],
                                                          ignore_index=True)
