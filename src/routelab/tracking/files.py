"""The tracking files of training and routing runs: the source of truth every tracker export replays.

:class:`RunLogger` writes everything a run reports into one directory (``prefix`` before each name):

- ``hparams.json``      hyperparameters (any JSON object);
- ``metrics.jsonl``     one object per :meth:`RunLogger.log` call, ``{"step": int, name: float, ...}``,
                        written as it happens (a crashed run still shows how far it got);
                        ``metrics.csv`` holds the same rows once the logger is closed;
- ``final.json``        final metrics (:meth:`RunLogger.log_final`);
- ``histograms.jsonl``  one object per histogram: ``name, step, edges [n+1], counts [n]``;
- ``system.jsonl``      system metrics snapshots (:func:`system_snapshot`: wall and CPU seconds, RSS and
                        CUDA memory in MiB) plus whatever the caller adds;
- ``artifacts.json``    ``[{"name", "path", "bytes"}]``: files the run produced.

:func:`read_run` reads them back; :mod:`routelab.tracking.export` replays them into trackers after the
run, which keeps the trackers out of the jobs that do the work.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from routelab.io.files import read_json, write_json

FILES = ("hparams.json", "metrics.jsonl", "metrics.csv", "final.json", "histograms.jsonl", "system.jsonl",
         "artifacts.json")


def system_snapshot(start: float | None = None) -> dict[str, float | None]:
    """Process resource use now: ``wall_s`` since ``start`` (a ``time.perf_counter()`` value, if
    given), ``cpu_s`` (user + system, this process), ``rss_mb`` (current), ``peak_rss_mb``, and
    ``cuda_allocated_mb`` / ``cuda_peak_mb`` (None without CUDA). Memory in MiB."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    snapshot: dict[str, float | None] = {}
    if start is not None:
        snapshot["wall_s"] = time.perf_counter() - start
    snapshot["cpu_s"] = usage.ru_utime + usage.ru_stime
    try:  # second field of statm: resident pages
        snapshot["rss_mb"] = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        snapshot["rss_mb"] = None
    snapshot["peak_rss_mb"] = usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    snapshot["cuda_allocated_mb"] = snapshot["cuda_peak_mb"] = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            snapshot["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
            snapshot["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return snapshot


def _number(name: str, value: Any) -> float | int | None:
    """A metric value as a JSON number (None for NaN / inf) or a clear error naming the metric."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r}: {value!r} is not a number")
    return value if isinstance(value, int) or math.isfinite(value) else None


class RunLogger:
    """Tracking files of one run (training or routing) in ``directory``; see the module docstring.

    Use as a context manager, or call :meth:`close`: closing writes ``metrics.csv`` and a last
    system snapshot. ``exporters`` (e.g. a :class:`TensorBoardExporter`) receive every record as well,
    live; :func:`export_run` does the same from the files after the run.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "", exporters: Iterable[Any] = ()):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.exporters = list(exporters)
        self.rows: list[dict[str, Any]] = []
        self.artifacts: list[dict[str, Any]] = []
        self.last_step = 0
        self._start = time.perf_counter()
        self._jsonl = open(self.path("metrics.jsonl"), "w")
        self._histograms = open(self.path("histograms.jsonl"), "w")
        self._system = open(self.path("system.jsonl"), "w")
        self._closed = False

    def path(self, name: str) -> Path:
        """Where the file ``name`` (one of :data:`FILES`) of this run lies."""
        return self.directory / f"{self.prefix}{name}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Hyperparameters (a JSON object; nested values allowed), written to ``hparams.json``."""
        write_json(self.path("hparams.json"), dict(params))
        for exporter in self.exporters:
            exporter.params(dict(params))

    def log(self, step: int, **metrics: Any) -> None:
        """Step-wise scalar metrics (``step`` counts optimiser steps or evaluation batches from 0)."""
        row = {"step": int(step), **{name: _number(name, value) for name, value in metrics.items()}}
        self.rows.append(row)
        self.last_step = row["step"]
        _append_line(self._jsonl, row)
        for exporter in self.exporters:
            exporter.scalars(row["step"], {k: v for k, v in row.items() if k != "step"})

    def log_final(self, **metrics: Any) -> None:
        """Final scalar metrics of the run (``final.json``; repeated calls add keys)."""
        path = self.path("final.json")
        final = read_json(path) if path.exists() else {}
        final.update({name: _number(name, value) for name, value in metrics.items()})
        write_json(path, final)
        for exporter in self.exporters:
            exporter.final({name: final[name] for name in metrics})

    def log_histogram(self, name: str, counts: Any, edges: Any | None = None, step: int | None = None) -> None:
        """A histogram of ``counts [n]`` over bins ``edges [n+1]`` (default: unit bins centred on
        0..n-1, the natural layout for counts of integers such as experts selected per token)."""
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        edges = np.arange(counts.size + 1) - 0.5 if edges is None else np.asarray(edges, dtype=np.float64)
        if edges.shape != (counts.size + 1,) or np.any(np.diff(edges) <= 0):
            raise ValueError(f"histogram {name!r}: edges must increase and be one longer than counts "
                             f"({counts.size}); got {edges.size}")
        if np.any(counts < 0):
            raise ValueError(f"histogram {name!r}: counts must be >= 0")
        record = {"name": name, "step": self.last_step if step is None else int(step),
                  "edges": edges.tolist(), "counts": counts.tolist()}
        _append_line(self._histograms, record)
        for exporter in self.exporters:
            exporter.histogram(record["name"], record["step"], edges, counts)

    def log_values_histogram(self, name: str, values: Any, bins: int = 30, step: int | None = None) -> None:
        """A histogram of raw ``values`` (``bins`` equal-width bins over their range, numpy's rule)."""
        counts, edges = np.histogram(np.asarray(values, dtype=np.float64).reshape(-1), bins=bins)
        self.log_histogram(name, counts, edges, step)

    def log_artifact(self, name: str, path: str | os.PathLike) -> None:
        """Record that the run produced the file (or directory) ``path`` under ``name``."""
        path = Path(path)
        size = path.stat().st_size if path.is_file() else None
        self.artifacts = [a for a in self.artifacts if a["name"] != name] + [
            {"name": name, "path": str(path), "bytes": size}]
        write_json(self.path("artifacts.json"), self.artifacts)
        for exporter in self.exporters:
            exporter.artifact(name, str(path))

    def log_system(self, step: int | None = None, **extra: Any) -> dict[str, Any]:
        """Append a :func:`system_snapshot` (plus ``extra`` numbers, e.g. ``tokens_per_s``) to
        ``system.jsonl`` and return it."""
        record = {"step": self.last_step if step is None else int(step), **system_snapshot(self._start),
                  **{name: _number(name, value) for name, value in extra.items()}}
        _append_line(self._system, record)
        for exporter in self.exporters:
            exporter.scalars(record["step"], {f"system/{k}": v for k, v in record.items() if k != "step"})
        return record

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.log_system()
        for handle in (self._jsonl, self._histograms, self._system):
            handle.close()
        if self.rows:
            fields = list(dict.fromkeys(k for row in self.rows for k in row))
            with open(self.path("metrics.csv"), "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)
        for exporter in self.exporters:
            exporter.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scalars(values: Mapping[str, Any]) -> dict[str, float | int]:
    """The plain numbers of a result dict (lists, dicts, text, booleans and None left out)."""
    return {name: value for name, value in values.items()
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))}


def log_routing_run(directory: str | os.PathLike, params: Mapping[str, Any], metrics: Mapping[str, Any],
                    summary: Mapping[str, Any], system: Mapping[str, Any], k_hist: Any | None = None,
                    artifacts: Mapping[str, str | os.PathLike] | None = None, exporters: Iterable[Any] = ()) -> None:
    """The tracking files of one routing run, from its results.

    - params: what determined the run (e.g. the provenance record);
    - step-wise metrics: the per-layer routing statistics of ``summary["per_layer"]``, the step being
      the MoE layer (so a TensorBoard scalar plot reads as a statistic across depth);
    - final metrics: the numbers of ``metrics`` (quality) and the top level of ``summary``;
    - histograms: ``experts_selected/layer_i`` from ``k_hist [layers, >= max_k + 1]`` (tokens by experts
      selected; the recorder state's ``k_hist``) and ``expert_load/layer_i`` from
      ``summary["expert_counts"] [layers][E]`` (selections per expert id);
    - system metrics: the numbers of ``system`` (wall time, tokens/s, peak memory) on top of a snapshot;
    - artifacts: ``{name: path}`` of the run's files.
    """
    with RunLogger(directory, exporters=exporters) as tracker:
        tracker.log_params(params)
        for entry in summary.get("per_layer", []):
            tracker.log(entry["layer"], **_scalars({k: v for k, v in entry.items() if k != "layer"}))
        if k_hist is not None:
            k_hist = np.asarray(k_hist)[:, : int(summary["max_k"]) + 1]
            for layer, counts in enumerate(k_hist):
                tracker.log_histogram(f"experts_selected/layer_{layer}", counts, step=layer)
        for layer, counts in enumerate(summary.get("expert_counts") or []):
            tracker.log_histogram(f"expert_load/layer_{layer}", counts, step=layer)
        tracker.log_final(**_scalars(metrics), **_scalars({k: v for k, v in summary.items() if k not in metrics}))
        tracker.log_system(**_scalars(system))
        for name, path in (artifacts or {}).items():
            if Path(path).exists():
                tracker.log_artifact(name, path)


def _append_line(handle: Any, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record, allow_nan=False) + "\n")
    handle.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(directory: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """Everything a :class:`RunLogger` wrote: ``params``, ``metrics`` (rows), ``final``, ``histograms``,
    ``system`` (rows), ``artifacts``. Missing files read as empty."""
    directory = Path(directory)

    def file(name: str) -> Path:
        return directory / f"{prefix}{name}"

    if not file("metrics.jsonl").exists() and not file("hparams.json").exists():
        raise FileNotFoundError(f"{directory}: no tracking files with prefix {prefix!r} (expected "
                                f"{prefix}metrics.jsonl or {prefix}hparams.json)")
    return {
        "params": read_json(file("hparams.json")) if file("hparams.json").exists() else {},
        "metrics": _read_jsonl(file("metrics.jsonl")),
        "final": read_json(file("final.json")) if file("final.json").exists() else {},
        "histograms": _read_jsonl(file("histograms.jsonl")),
        "system": _read_jsonl(file("system.jsonl")),
        "artifacts": read_json(file("artifacts.json")) if file("artifacts.json").exists() else [],
    }
