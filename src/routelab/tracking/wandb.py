"""Weights & Biases: a run's tracking files as one W&B run, offline by default (``wandb sync`` uploads it).

W&B keeps one history row per step and drops a row whose step is lower than one already logged, while
a routing run's files revisit steps (per-layer statistics, then histograms per layer). The exporter
therefore gathers everything by step and logs the rows in step order when it closes.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from routelab.tracking.export import TrackingError, require

log = logging.getLogger(__name__)

MODES = ("offline", "online")
MAX_BINS = 512  # wandb.Histogram's limit


class WandbExporter:
    """One W&B run named ``run_name`` in ``project`` (and ``entity``), written under ``directory/wandb/``.

    ``tags`` (``{key: value}``) become W&B tags ``key:value`` (those of at most 64 characters), and set
    the run's ``group`` (the experiment) and ``job_type`` (the stage), the fields W&B's tables group and
    filter by. Parameters are the run's config; scalars and histograms history rows at their step; final
    metrics ``final/NAME`` in the run's summary (set after the history, which would otherwise overwrite a
    summary key with its last row); artifacts one reference artifact of the run's files (paths, not copies).
    """

    def __init__(self, directory: str | os.PathLike, project: str, run_name: str, entity: str | None = None,
                 mode: str = "offline", tags: Mapping[str, str] | None = None):
        if mode not in MODES:
            raise TrackingError(f"tracking.wandb.mode: {mode!r} is not valid; use one of {', '.join(MODES)}")
        wandb = require("wandb", "tracking.wandb")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        tags = dict(tags or {})
        self._run = wandb.init(
            project=project, entity=entity, name=run_name, dir=str(self.directory), mode=mode,
            group=tags.get("experiment"), job_type=tags.get("stage"),
            # W&B refuses tags over 64 characters: a config_hash tag would not fit (it is in the config)
            tags=[f"{key}:{value}" for key, value in tags.items() if value and len(f"{key}:{value}") <= 64],
            reinit="create_new", settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
        self._wandb = wandb
        self._rows: dict[int, dict[str, Any]] = defaultdict(dict)
        self._final: dict[str, Any] = {}
        self._artifacts: list[tuple[str, str]] = []
        self.run_name = run_name

    @property
    def run_dir(self) -> Path:
        """The run's own folder (``.../wandb/offline-run-DATE-ID`` offline), what ``wandb sync`` takes."""
        return Path(self._run.dir).parent

    def params(self, params: dict[str, Any]) -> None:
        self._run.config.update(params, allow_val_change=True)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        self._rows[int(step)].update({name: value for name, value in values.items() if value is not None})

    def final(self, values: dict[str, Any], step: int = 0) -> None:
        self._final.update({f"final/{name}": value for name, value in values.items() if value is not None})

    def histogram(self, name: str, step: int, edges: np.ndarray, counts: np.ndarray) -> None:
        if counts.size > MAX_BINS:
            raise TrackingError(f"histogram {name!r}: {counts.size} bins; W&B keeps at most {MAX_BINS}")
        self._rows[int(step)][name] = self._wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))

    def artifact(self, name: str, path: str) -> None:
        self._artifacts.append((name, path))

    def close(self) -> None:
        for step in sorted(self._rows):
            self._run.log(self._rows[step], step=step)
        self._run.summary.update(self._final)
        present = [(name, Path(path).resolve()) for name, path in self._artifacts if Path(path).exists()]
        for name, path in self._artifacts:
            if not Path(path).exists():  # a path relative to another directory, or a file since deleted
                log.warning("W&B run %s: artifact %s is not at %s; left out", self.run_name, name, path)
        if present:
            files = self._wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", self.run_name) + "-files", type="run-files")
            for name, path in present:
                files.add_reference(path.as_uri(), name=name, checksum=False)
            self._run.log_artifact(files)
        self._run.finish()
