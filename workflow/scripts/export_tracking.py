#!/usr/bin/env python
"""Stage export_tracking: replay the runs' tracking files into TensorBoard and/or MLflow.

The files each run wrote (``<run>/tracking/``, and the demo model's ``train_*`` files) stay the source
of truth; this stage copies them into the trackers the config switches on (``tracking.tensorboard``,
``tracking.mlflow_uri``) and writes a list of what it exported to ``--out``.

    python workflow/scripts/export_tracking.py --experiment demo --runs results/demo/runs/*/* \
        --model-dir results/demo/model --tensorboard-dir results/demo/tracking/tensorboard \
        --mlflow-uri sqlite:///results/demo/mlflow.db --out results/demo/tracking/exported.json

TensorBoard: ``tensorboard --logdir results/demo/tracking/tensorboard``. MLflow:
``mlflow ui --backend-store-uri sqlite:///results/demo/mlflow.db``. Each export adds new MLflow runs
(tagged with the run's ``config_hash``); the TensorBoard folder is rewritten.
"""

import argparse
import logging
import shutil
from pathlib import Path

from routelab.cli import run
from routelab.io.files import read_json, write_json
from routelab.tracking import MlflowExporter, TensorBoardExporter, TrackingError, export_run

log = logging.getLogger("export_tracking")


def exporters(args: argparse.Namespace, name: str, tags: dict[str, str]) -> list:
    found = []
    if args.tensorboard_dir:
        found.append(TensorBoardExporter(Path(args.tensorboard_dir) / name))
    if args.mlflow_uri:
        found.append(MlflowExporter(args.mlflow_uri, args.experiment, name, tags=tags))
    return found


def main(args: argparse.Namespace) -> None:
    if not args.tensorboard_dir and not args.mlflow_uri:
        raise ValueError("nothing to export to: give --tensorboard-dir and/or --mlflow-uri")
    if args.tensorboard_dir and Path(args.tensorboard_dir).exists():
        shutil.rmtree(args.tensorboard_dir)  # event files append: a rerun would show every point twice
    sources = []
    if args.model_dir:
        sources.append(("train_demo_model", Path(args.model_dir), "train_", {"stage": "train_demo_model"}))
    for run_dir in map(Path, args.runs):
        tracking = run_dir / "tracking"
        if not (tracking / "hparams.json").exists():
            log.warning("%s has no tracking files (a run from before tracking): skipped", run_dir)
            continue
        params = read_json(tracking / "hparams.json")
        tags = {"stage": "route", "routing": run_dir.parent.name, "dataset": run_dir.name,
                "config_hash": str(params.get("config_hash", ""))}
        sources.append((f"route/{run_dir.parent.name}/{run_dir.name}", tracking, "", tags))
    exported = []
    for name, directory, prefix, tags in sources:
        try:
            counts = export_run(directory, exporters(args, name, tags), prefix=prefix)
        except TrackingError as exc:
            raise ValueError(str(exc)) from None
        exported.append({"name": name, "directory": str(directory), **counts})
        log.info("exported %s: %s", name, counts)
    write_json(args.out, {"tensorboard_dir": args.tensorboard_dir, "mlflow_uri": args.mlflow_uri,
                          "experiment": args.experiment, "runs": exported})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="experiment name (the MLflow experiment)")
    parser.add_argument("--runs", nargs="*", default=[], help="run directories (results/EXP/runs/ROUTING/DATASET)")
    parser.add_argument("--model-dir", default=None, help="the demo model's directory (train_* tracking files)")
    parser.add_argument("--tensorboard-dir", default=None, help="write TensorBoard event files here")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI, e.g. sqlite:///results/demo/mlflow.db")
    parser.add_argument("--out", required=True, help="JSON list of what was exported")
    run(main, parser)
