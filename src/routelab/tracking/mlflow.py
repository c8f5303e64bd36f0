"""MLflow: a run's tracking files as one MLflow run (parameters, metrics, histogram artifacts, tags)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from routelab.tracking.export import flatten_params, require


class MlflowExporter:
    """One MLflow run (in experiment ``experiment``, named ``run_name``) in the store at ``tracking_uri``.

    Parameters are flattened (:func:`flatten_params`); scalars and system metrics become metrics with
    their step; final metrics ``final/NAME``; histograms JSON artifacts ``histograms/NAME.json``;
    artifact paths the tags ``artifact.NAME`` (the files stay where the pipeline wrote them). For a
    ``sqlite:///DIR/x.db`` store, artifacts go to ``DIR/mlflow-artifacts``. SQLite serialises writers:
    export from one process at a time (the export rule does).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None):
        tracking = require("mlflow.tracking", "tracking.mlflow_uri", package="mlflow-skinny")
        self._client = tracking.MlflowClient(tracking_uri=tracking_uri)
        found = self._client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if tracking_uri.startswith("sqlite:///"):
                location = (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlflow-artifacts").as_uri()
            experiment_id = self._client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        self.run_id = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id
        self._timestamp = int(time.time() * 1000)

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow keeps parameter values as text of at most 6000 characters.
        items = [Param(key, str(value)[:6000]) for key, value in flatten_params(params).items()]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(name, float(value), self._timestamp, int(step)) for name, value in values.items()
                   if value is not None]
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def final(self, values: dict[str, Any], step: int = 0) -> None:
        self.scalars(step, {f"final/{name}": value for name, value in values.items()})

    def histogram(self, name: str, step: int, edges: np.ndarray, counts: np.ndarray) -> None:
        self._client.log_dict(self.run_id, {"name": name, "step": step, "edges": edges.tolist(),
                                            "counts": counts.tolist()}, f"histograms/{name}/step_{step}.json")

    def artifact(self, name: str, path: str) -> None:
        self._client.set_tag(self.run_id, f"artifact.{name}", path)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)
