"""Aim: a run's tracking files as one Aim run in a local repository, queryable with ``Repo.query_metrics``.

Aim finds a run in a query only once the run is indexed, which ``aim up`` otherwise does in the
background; the exporter indexes each run as it closes it (the call ``aim storage reindex`` makes), so a
notebook can query the repository as soon as the export ends. Every exported run carries the tag
``routelab`` and one tag ``key:value`` per grouping key (experiment, stage, routing, method, dataset),
so ``repo.query_metrics('metric.name == "final/perplexity" and "method:bh" in run.tags')`` finds them
and the tags group them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from routelab.tracking.export import TrackingError, require

TAG = "routelab"


def open_repo(path: str | os.PathLike):
    """The Aim repository at ``path``, created if there is none."""
    aim = require("aim", "tracking.aim")
    Path(path).mkdir(parents=True, exist_ok=True)
    return aim.Repo.from_path(str(path), init=not aim.Repo.exists(str(path)))


def index_run(repo, run_hash: str) -> None:
    """Add a closed run to the repository's index, where queries look."""
    from aim.sdk.index_manager import RepoIndexManager

    RepoIndexManager.get_index_manager(repo).index(run_hash)


class AimExporter:
    """One Aim run named ``run_name`` in Aim experiment ``experiment`` of the repository at ``repo``.

    Parameters under ``run["hparams"]``; scalars and system metrics tracked with their step; final metrics
    tracked as ``final/NAME`` at the last step; histograms as ``aim.Distribution`` at their step (equal
    bins, as every routelab histogram has); artifact paths under ``run["artifacts"]``.
    """

    def __init__(self, repo: str | os.PathLike, experiment: str, run_name: str,
                 tags: Mapping[str, str] | None = None):
        aim = require("aim", "tracking.aim")
        self._aim = aim
        self._repo = open_repo(repo)
        self._run = aim.Run(repo=self._repo, experiment=experiment, system_tracking_interval=None,
                            log_system_params=False, capture_terminal_logs=False)
        self._run.name = run_name
        self._run.add_tag(TAG)
        for key, value in (tags or {}).items():
            if value:
                self._run.add_tag(f"{key}:{value}")
        self._artifacts: dict[str, str] = {}
        self.run_hash = self._run.hash

    def params(self, params: dict[str, Any]) -> None:
        self._run["hparams"] = params

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if value is not None:
                self._run.track(float(value), name=name, step=int(step))

    def final(self, values: dict[str, Any], step: int = 0) -> None:
        self.scalars(step, {f"final/{name}": value for name, value in values.items()})

    def histogram(self, name: str, step: int, edges: np.ndarray, counts: np.ndarray) -> None:
        widths = np.diff(edges)
        if not np.allclose(widths, widths[0]):
            raise TrackingError(f"histogram {name!r}: Aim distributions need equal bins; got widths "
                                f"{widths.min():g} to {widths.max():g}")
        distribution = self._aim.Distribution(hist=np.asarray(counts, dtype=np.int64),
                                              bin_range=(float(edges[0]), float(edges[-1])))
        self._run.track(distribution, name=name, step=int(step))

    def artifact(self, name: str, path: str) -> None:
        self._artifacts[name] = path
        self._run["artifacts"] = dict(self._artifacts)

    def close(self) -> None:
        self._run.close()
        index_run(self._repo, self.run_hash)
