#!/usr/bin/env python
"""Build the cross-run comparison report.

Reads the aggregate run table (runs.parquet); writes into REPORT_DIR comparison.csv, comparison.md,
figures/experts_vs_alpha.png (a placeholder when there are no BH runs), figures/quality_vs_experts.png
and report.html, which links the per-run figures under PLOTS_ROOT relative to itself. Prints the
absolute path of report.html.
"""

import argparse
import logging
from pathlib import Path

import pandas as pd

from routelab.report import write_report

log = logging.getLogger("report")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, type=Path, help="runs.parquet from the aggregate stage")
    parser.add_argument("--plots-root", required=True, type=Path,
                        help="per-run figures root: PLOTS_ROOT/{routing}/{dataset}/*.png")
    parser.add_argument("--experiment", required=True, help="experiment name shown in the report")
    parser.add_argument("--baseline", required=True, help="routing name the others are compared to")
    parser.add_argument("--out-dir", required=True, type=Path, help="directory the report goes to")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.runs.is_file():
        raise FileNotFoundError(f"run table missing: {args.runs}")
    runs = pd.read_parquet(args.runs)
    report = write_report(runs, args.out_dir, args.experiment, args.baseline, args.plots_root)
    log.info("wrote report of %d runs to %s", len(runs), args.out_dir)
    print(report.resolve())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
