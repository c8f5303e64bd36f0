#!/usr/bin/env python
"""Build the cross-run comparison report.

Reads the aggregate tables (runs.parquet and, beside it, scores.parquet, expert_counts.parquet and
coactivation.parquet when present); writes into REPORT_DIR findings.md, findings.json, comparison.csv, comparison.md,
comparison.tex, the statistics as CSV, figures/*.png and report.html, which shows the figures beside
it and links the per-run figures under PLOTS_ROOT relative to itself. Prints the absolute path of
report.html.
"""

import argparse
import logging
import time
from pathlib import Path

import pandas as pd

from routelab.cli import layer_option
from routelab.config import section_defaults
from routelab.report.build import ReportOptions, write_report

log = logging.getLogger("report")
AGGREGATE_TABLES = ("scores", "expert_counts", "coactivation")


def parse_args() -> argparse.Namespace:
    defaults = section_defaults("report")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, type=Path, help="runs.parquet from the aggregate stage")
    parser.add_argument("--plots-root", required=True, type=Path,
                        help="per-run figures root: PLOTS_ROOT/{routing}/{dataset}/*.png (+ index.json)")
    parser.add_argument("--experiment", required=True, help="experiment name shown in the report")
    parser.add_argument("--baseline", required=True, help="routing name the others are compared to")
    parser.add_argument("--repetitions", type=int, default=defaults["bootstrap_repetitions"],
                        help="bootstrap resamples per confidence interval (default %(default)s)")
    parser.add_argument("--confidence", type=float, default=defaults["confidence"],
                        help="confidence level of the intervals (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="bootstrap seed (default %(default)s)")
    parser.add_argument("--layer", type=layer_option, default=defaults["layer"],
                        help="layer of the expert-activation figures; 'None' (the default) = the "
                             "co-activation table's")
    parser.add_argument("--tolerances", type=float, nargs="+", default=defaults["tolerances"],
                        help="relative quality losses the findings test, e.g. 0.01 for 1 %% (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing the figures, at most 2 used (default 1)")
    parser.add_argument("--out-dir", required=True, type=Path, help="directory the report goes to")
    return parser.parse_args()


def read_optional(path: Path) -> pd.DataFrame | None:
    if path.is_file():
        return pd.read_parquet(path)
    log.warning("%s is missing: its report sections are skipped", path)
    return None


def main() -> None:
    args = parse_args()
    if not args.runs.is_file():
        raise FileNotFoundError(f"run table missing: {args.runs}")
    start = time.perf_counter()
    runs = pd.read_parquet(args.runs)
    tables = {name: read_optional(args.runs.parent / f"{name}.parquet") for name in AGGREGATE_TABLES}
    analyses = {path.stem: pd.read_parquet(path) for path in sorted(args.runs.parent.glob("*.parquet"))
                if path.stem not in {"runs", *AGGREGATE_TABLES}}
    options = ReportOptions(repetitions=args.repetitions, confidence=args.confidence, seed=args.seed,
                            layer=args.layer, tolerances=tuple(args.tolerances))
    report = write_report(runs, args.out_dir, args.experiment, args.baseline, args.plots_root, options=options,
                          analyses=analyses, workers=args.workers, **tables)
    log.info("wrote report of %d runs to %s in %.1f s", len(runs), args.out_dir, time.perf_counter() - start)
    print(report.resolve())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rliable logs a line per bootstrap call
    main()
