#!/usr/bin/env python
"""Aggregate run directories into tidy tables.

Reads RUN_DIR/summary.json and RUN_DIR/metrics.json of every run; writes AGG_DIR/runs.csv and
AGG_DIR/runs.parquet (one row per run) and AGG_DIR/layers.csv (one row per run and layer).
"""

import argparse
import logging
from pathlib import Path

from routelab.aggregate import collect_layers, collect_runs
from routelab.io import write_parquet, write_text

log = logging.getLogger("aggregate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (results/{experiment}/runs/{routing}/{dataset})")
    parser.add_argument("--out-dir", required=True, type=Path, help="directory the tables go to")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    runs = collect_runs(args.runs)
    layers = collect_layers(args.runs)
    write_text(args.out_dir / "runs.csv", runs.to_csv(index=False))
    write_parquet(args.out_dir / "runs.parquet", runs)
    write_text(args.out_dir / "layers.csv", layers.to_csv(index=False))
    log.info("aggregated %d runs (%d layer rows) into %s", len(runs), len(layers), args.out_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
