"""Experiment tracking: files on disk first (:mod:`.files`), replayed into trackers after the run.

- :mod:`routelab.tracking.files`: :class:`RunLogger` writes a run's tracking files, :func:`read_run`
  reads them; :func:`log_routing_run` lays out a routing run's results as such files.
- :mod:`routelab.tracking.export`: :func:`export_run` replays one run's files into exporters;
  :func:`export_sources` lists an experiment's runs and their tags.
- One module per tracker, each an optional extra (``pip install 'routelab[tracking]'``) imported only
  when its exporter is made: :class:`TensorBoardExporter`, :class:`MlflowExporter`,
  :class:`WandbExporter` (offline runs by default), :class:`AimExporter`.
"""

from routelab.tracking.aim import AimExporter
from routelab.tracking.export import (
    ExportSource,
    TrackingError,
    export_run,
    export_sources,
    flatten_params,
)
from routelab.tracking.files import FILES, RunLogger, log_routing_run, read_run, system_snapshot
from routelab.tracking.mlflow import MlflowExporter
from routelab.tracking.tensorboard import TensorBoardExporter
from routelab.tracking.wandb import WandbExporter

__all__ = ["FILES", "AimExporter", "ExportSource", "MlflowExporter", "RunLogger", "TensorBoardExporter",
           "TrackingError", "WandbExporter", "export_run", "export_sources", "flatten_params", "log_routing_run",
           "read_run", "system_snapshot"]
