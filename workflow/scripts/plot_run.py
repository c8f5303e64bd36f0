#!/usr/bin/env python
"""Per-run figures of one or more (routing, dataset) runs, each into its own plot directory.

Reads each RUN_DIR/summary.json, routing.parquet (token, layer, k, experts, weights) and decisions.parquet
(sampled logits and p-values); writes into PLOT_DIR the ten figures of routelab.catalogue.RUN_FIGURES
(experts histogram, layer x expert heatmap, p-value distribution, logit vs p-value, BH step-up samples,
BH pass rate by rank, sample-sequence routing heatmap, expert utilisation, token rarity vs experts,
per-layer box plots) and index.json: [{"file", "title", "drawn"}], drawn false (with a "reason") for a
figure that does not apply to the run, e.g. p-value figures of a top-k router.
"""

import argparse
import logging
import time
from pathlib import Path

from routelab.plot.run_figures import draw_run_figures, load_token_decoder

log = logging.getLogger("plot_run")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path, nargs="+",
                        help="run directories holding summary.json, routing.parquet and decisions.parquet")
    parser.add_argument("--out-dir", required=True, type=Path, nargs="+",
                        help="directories the PNG figures and index.json go to, one per --run-dir, in order")
    parser.add_argument("--model", default=None,
                        help="model directory or hub id whose tokenizer turns token ids into text for the "
                             "sample-sequence heatmap (token ids are shown without it)")
    args = parser.parse_args()
    if len(args.out_dir) != len(args.run_dir):
        parser.error(f"--out-dir: {len(args.out_dir)} directories given for {len(args.run_dir)} --run-dir; "
                     "need one per run")
    return args


def main() -> None:
    args = parse_args()
    decode = load_token_decoder(args.model) if args.model else None
    for run_dir, out_dir in zip(args.run_dir, args.out_dir):
        start = time.perf_counter()
        index = draw_run_figures(run_dir, out_dir, decode=decode)
        drawn = sum(entry["drawn"] for entry in index)
        log.info("wrote %d figures (%d drawn, %d not applicable) and index.json to %s in %.1f s",
                 len(index), drawn, len(index) - drawn, out_dir, time.perf_counter() - start)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
