#!/usr/bin/env python
"""Aggregate run directories into tidy tables, so the report needs no run directories.

Reads summary.json, metrics.json, system.json, scores.parquet and (one layer of) routing.parquet of
every run; writes into AGG_DIR:
  runs.csv, runs.parquet     one row per run (routing parameters, quality, routing statistics, speed)
  layers.csv                 one row per (run, layer)
  scores.parquet             one row per (run, document): the per-document scores
  expert_counts.parquet      one row per (run, layer, expert): tokens routed to the expert
  coactivation.parquet       one row per (run, expert pair) of LAYER with a non-zero count
"""

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from routelab.cli import layer_option
from routelab.io.files import write_parquet, write_text
from routelab.report.aggregate import (
    collect_coactivation,
    collect_expert_counts,
    collect_layers,
    collect_runs,
    collect_scores,
)

log = logging.getLogger("aggregate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (results/{experiment}/runs/{routing}/{dataset})")
    parser.add_argument("--layer", type=layer_option, default=None,
                        help="MoE layer whose expert co-activation is counted; 'None' (the default) = the "
                             "middle layer")
    parser.add_argument("--out-dir", required=True, type=Path, help="directory the tables go to")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    runs = collect_runs(args.runs)
    layers = collect_layers(args.runs)
    write_text(args.out_dir / "runs.csv", runs.to_csv(index=False))
    write_parquet(args.out_dir / "runs.parquet", runs)
    write_text(args.out_dir / "layers.csv", layers.to_csv(index=False))
    scores = collect_scores(args.runs)
    write_parquet(args.out_dir / "scores.parquet", scores)
    write_parquet(args.out_dir / "expert_counts.parquet", collect_expert_counts(args.runs))
    coactivation = collect_coactivation(tqdm(args.runs, desc="co-activation", unit="run"), layer=args.layer)
    write_parquet(args.out_dir / "coactivation.parquet", coactivation)
    log.info("aggregated %d runs (%d layer rows, %d document scores, co-activation of layer %d) into %s",
             len(runs), len(layers), len(scores), int(coactivation["layer"].iloc[0]), args.out_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
