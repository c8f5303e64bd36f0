#!/usr/bin/env python
"""Per-run figures of one (routing, dataset) run.

Reads RUN_DIR/summary.json; writes PLOT_DIR/experts_histogram.png (experts selected per token and
layer, from k_histogram) and PLOT_DIR/expert_heatmap.png (% of tokens routed to each expert in each
layer, from expert_counts and per_layer decisions).
"""

import argparse
import logging
from pathlib import Path

from routelab.aggregate import read_run_file
from routelab.plots import expert_heatmap, experts_histogram_from_counts

log = logging.getLogger("plot_run")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path, help="directory holding summary.json")
    parser.add_argument("--out-dir", required=True, type=Path, help="directory the PNG figures go to")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    summary = read_run_file(args.run_dir, "summary.json")
    name = f"{summary['routing']} on {summary['dataset']}"
    experts_histogram_from_counts(summary["k_histogram"], summary["min_k"], summary["max_k"],
                                  title=name, path=args.out_dir / "experts_histogram.png")
    expert_heatmap(summary["expert_counts"], title=name, path=args.out_dir / "expert_heatmap.png",
                   tokens_per_layer=[layer["decisions"] for layer in summary["per_layer"]])
    log.info("wrote figures of %s to %s", name, args.out_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
