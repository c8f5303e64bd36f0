"""Replaying a run's tracking files into trackers (TensorBoard, MLflow, Weights & Biases, Aim).

An exporter is any object with the methods of :class:`Exporter`; :func:`export_run` feeds it one run's
files in a fixed order and closes it. :func:`export_sources` names the runs of an experiment and the
tags every tracker groups them by.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from routelab.io.files import read_json
from routelab.tracking.files import read_run

EXTRA = "pip install 'routelab[tracking]'"


class TrackingError(RuntimeError):
    """A tracker that cannot be used as configured (missing package, unusable URI)."""


class Exporter(Protocol):
    """What :func:`export_run` calls, in this order: ``params`` once; ``scalars`` per metrics row and per
    system row (names ``system/NAME``); ``histogram`` per histogram; ``artifact`` per file; ``final``
    once, at the last metrics step; ``close``."""

    def params(self, params: dict[str, Any]) -> None: ...

    def scalars(self, step: int, values: dict[str, Any]) -> None: ...

    def histogram(self, name: str, step: int, edges: np.ndarray, counts: np.ndarray) -> None: ...

    def artifact(self, name: str, path: str) -> None: ...

    def final(self, values: dict[str, Any], step: int = 0) -> None: ...

    def close(self) -> None: ...


def require(module: str, option: str, package: str | None = None) -> ModuleType:
    """Import a tracker's package, or raise a :class:`TrackingError` naming the config option and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackingError(f"{option} needs the {package or module!r} package: {EXTRA} "
                            f"(or pip install {package or module})") from exc


def export_run(directory: str | os.PathLike, exporters: Iterable[Exporter], prefix: str = "") -> dict[str, int]:
    """Replay one run's tracking files into ``exporters`` (then closed); returns what was sent."""
    run = read_run(directory, prefix)
    exporters = list(exporters)
    last_step = max([row["step"] for row in run["metrics"]] or [0])
    for exporter in exporters:
        exporter.params(run["params"])
        for row in run["metrics"]:
            exporter.scalars(row["step"], {k: v for k, v in row.items() if k != "step"})
        for row in run["system"]:
            exporter.scalars(row["step"], {f"system/{k}": v for k, v in row.items() if k != "step"})
        for record in run["histograms"]:
            exporter.histogram(record["name"], record["step"], np.asarray(record["edges"]),
                               np.asarray(record["counts"]))
        for artifact in run["artifacts"]:
            exporter.artifact(artifact["name"], artifact["path"])
        if run["final"]:
            exporter.final(run["final"], step=last_step)
        exporter.close()
    return {"metrics": len(run["metrics"]), "system": len(run["system"]), "histograms": len(run["histograms"]),
            "artifacts": len(run["artifacts"]), "final": len(run["final"])}


@dataclass(frozen=True)
class ExportSource:
    """One run to export: its display ``name`` (``train_demo_model`` or ``route/ROUTING/DATASET``), the
    ``directory`` and file ``prefix`` of its tracking files, and the ``tags`` it is grouped by."""

    name: str
    directory: Path
    prefix: str
    tags: dict[str, str]


def export_sources(experiment: str, run_dirs: Iterable[str | os.PathLike],
                   model_dir: str | os.PathLike | None = None) -> tuple[list[ExportSource], list[Path]]:
    """The runs of ``experiment`` with tracking files, and the run directories without any (skipped).

    Tags: ``experiment`` and ``stage`` always; routing runs add ``routing`` (the config's name), ``method``
    (its rule), ``dataset`` and ``config_hash`` (provenance.json's hash of everything that determines it).
    """
    sources = []
    if model_dir is not None:
        sources.append(ExportSource("train_demo_model", Path(model_dir), "train_",
                                    {"experiment": experiment, "stage": "train_demo_model"}))
    skipped = []
    for run_dir in map(Path, run_dirs):
        tracking = run_dir / "tracking"
        if not (tracking / "hparams.json").exists():
            skipped.append(run_dir)
            continue
        params = read_json(tracking / "hparams.json")
        routing, dataset = run_dir.parent.name, run_dir.name
        tags = {"experiment": experiment, "stage": "route", "routing": routing,
                "method": str((params.get("routing") or {}).get("method", "")), "dataset": dataset,
                "config_hash": str(params.get("config_hash", ""))}
        sources.append(ExportSource(f"route/{routing}/{dataset}", tracking, "", tags))
    return sources, skipped


def flatten_params(params: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    """Nested parameters as one level, ``{"a": {"b": 1}} -> {"a.b": 1}``; lists become JSON text."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}.{key}" if parent else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat
