#!/usr/bin/env python
"""Stage export_tracking: replay the runs' tracking files into TensorBoard, MLflow, W&B and/or Aim.

The files each run wrote (``<run>/tracking/``, and the demo model's ``train_*`` files) stay the source
of truth; this stage copies them into the trackers the config switches on (``tracking.tensorboard``,
``tracking.mlflow_uri``, ``tracking.wandb``, ``tracking.aim``) and writes a list of what it exported to
``--out``.

    python workflow/scripts/export_tracking.py --experiment demo --runs results/demo/runs/*/* \
        --model-dir results/demo/model --tensorboard-dir results/demo/tracking/tensorboard \
        --mlflow-uri sqlite:///results/demo/mlflow.db --wandb-dir results/demo/tracking \
        --aim-repo results/demo/tracking/aim --out results/demo/tracking/exported.json

TensorBoard: ``tensorboard --logdir results/demo/tracking/tensorboard``. MLflow:
``mlflow ui --backend-store-uri sqlite:///results/demo/mlflow.db``. W&B: ``wandb sync
results/demo/tracking/wandb/offline-run-*``. Aim: ``aim up --repo results/demo/tracking/aim``.
Re-exporting rewrites the TensorBoard and W&B folders and, with ``--rewrite-aim``, the Aim repository
(the pipeline's own one under results/); each export adds new runs to MLflow and to an Aim repository of
your own (all tagged with the run's ``config_hash``).
"""

import argparse
import logging
import shutil
from pathlib import Path

from routelab.cli import run
from routelab.io.files import write_json
from routelab.tracking import (
    AimExporter,
    MlflowExporter,
    TensorBoardExporter,
    TrackingError,
    WandbExporter,
    export_run,
    export_sources,
)

log = logging.getLogger("export_tracking")


def exporters(args: argparse.Namespace, name: str, tags: dict[str, str]) -> list:
    found = []
    if args.tensorboard_dir:
        found.append(TensorBoardExporter(Path(args.tensorboard_dir) / name))
    if args.mlflow_uri:
        found.append(MlflowExporter(args.mlflow_uri, args.experiment, name, tags=tags))
    if args.wandb_dir:
        found.append(WandbExporter(args.wandb_dir, args.wandb_project, name, entity=args.wandb_entity,
                                   mode=args.wandb_mode, tags=tags))
    if args.aim_repo:
        found.append(AimExporter(args.aim_repo, args.experiment, name, tags=tags))
    return found


def main(args: argparse.Namespace) -> None:
    logging.getLogger("aim").setLevel(logging.WARNING)  # a line per run's writer thread otherwise
    if not (args.tensorboard_dir or args.mlflow_uri or args.wandb_dir or args.aim_repo):
        raise ValueError("nothing to export to: give --tensorboard-dir, --mlflow-uri, --wandb-dir and/or --aim-repo")
    # Event files, W&B runs and Aim runs append: a rerun would show every point twice.
    for folder in (args.tensorboard_dir, args.wandb_dir and Path(args.wandb_dir) / "wandb",
                   args.rewrite_aim and args.aim_repo):
        if folder and Path(folder).exists():
            shutil.rmtree(folder)
    try:
        sources, skipped = export_sources(args.experiment, args.runs, args.model_dir)
        for run_dir in skipped:
            log.warning("%s has no tracking files (a run from before tracking): skipped", run_dir)
        exported = []
        for source in sources:
            counts = export_run(source.directory, exporters(args, source.name, source.tags), prefix=source.prefix)
            exported.append({"name": source.name, "directory": str(source.directory), "tags": source.tags, **counts})
            log.info("exported %s: %s", source.name, counts)
    except TrackingError as exc:
        raise ValueError(str(exc)) from None
    write_json(args.out, {"tensorboard_dir": args.tensorboard_dir, "mlflow_uri": args.mlflow_uri,
                          "wandb_dir": args.wandb_dir and str(Path(args.wandb_dir) / "wandb"),
                          "aim_repo": args.aim_repo, "experiment": args.experiment, "runs": exported})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="experiment name (MLflow / Aim experiment, W&B group)")
    parser.add_argument("--runs", nargs="*", default=[], help="run directories (results/EXP/runs/ROUTING/DATASET)")
    parser.add_argument("--model-dir", default=None, help="the demo model's directory (train_* tracking files)")
    parser.add_argument("--tensorboard-dir", default=None, help="write TensorBoard event files here")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI, e.g. sqlite:///results/demo/mlflow.db")
    parser.add_argument("--wandb-dir", default=None, help="W&B runs go to DIR/wandb/ (offline-run-* folders)")
    parser.add_argument("--wandb-project", default="routelab", help="W&B project")
    parser.add_argument("--wandb-entity", default=None, help="W&B entity (team or user)")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online"], help="W&B mode")
    parser.add_argument("--aim-repo", default=None, help="Aim repository directory (created if missing)")
    parser.add_argument("--rewrite-aim", action="store_true",
                        help="delete the Aim repository first (the pipeline's own, results/EXP/tracking/aim)")
    parser.add_argument("--out", required=True, help="JSON list of what was exported")
    run(main, parser)
