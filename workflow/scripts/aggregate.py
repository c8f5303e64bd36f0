#!/usr/bin/env python
"""Aggregate run directories into tidy tables, so the report needs no run directories.

Reads summary.json, metrics.json, system.json, scores.parquet, routing.parquet (once per run),
decisions.parquet and explorer.parquet of every run; writes into AGG_DIR:
  runs.csv, runs.parquet       one row per run (routing parameters, quality, routing statistics, speed)
  layers.csv                   one row per (run, layer)
  scores.parquet               one row per (run, document): the per-document scores
  expert_counts.parquet        one row per (run, layer, expert): tokens routed to the expert
  coactivation.parquet         one row per (run, expert pair) of LAYER with a non-zero count
  vocabulary.parquet, vocabulary_top_tokens.parquet, cross_layer.parquet, locality.parquet,
  baseline_agreement.parquet, k_by_position.parquet, k_by_frequency.parquet
                               the routing analyses (routelab.report.routing_analyses)
  router_diagnostics.parquet   router entropy and top-1 margin histograms per (run, layer), sampled tokens
  explorer.parquet             the token explorer's documents (routelab.report.explorer)
"""

import argparse
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from routelab.cli import layer_option
from routelab.io.files import write_parquet, write_text
from routelab.report.aggregate import collect_expert_counts, collect_layers, collect_runs, collect_scores
from routelab.report.diagnostics import collect_router_diagnostics
from routelab.report.explorer import collect_explorer
from routelab.report.routing_analyses import collect_routing_analyses
from routelab.report.tokens import load_decoder

log = logging.getLogger("aggregate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (results/{experiment}/runs/{routing}/{dataset})")
    parser.add_argument("--baseline", required=True, help="routing config the agreement analysis compares with")
    parser.add_argument("--tokenizer", default=None,
                        help="model directory whose tokenizer decodes token ids to text (top tokens, explorer); "
                             "none: token ids are shown")
    parser.add_argument("--layer", type=layer_option, default=None,
                        help="MoE layer whose expert co-activation is counted; 'None' (the default) = the "
                             "middle layer")
    parser.add_argument("--explorer-documents", type=int, default=3,
                        help="documents per run the report's token explorer shows (default %(default)s)")
    parser.add_argument("--explorer-tokens", type=int, default=128,
                        help="tokens per explorer document, the first ones (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes for the routing analyses, each task part of one dataset's runs (default "
                             "%(default)s)")
    parser.add_argument("--out-dir", required=True, type=Path, help="directory the tables go to")
    return parser.parse_args()


@contextmanager
def stage(name: str):
    """Logs a stage's seconds, so the log shows where a slow aggregate spends its time."""
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", name, time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    with stage("runs, layers, scores, expert counts"):
        runs = collect_runs(args.runs)
        layers = collect_layers(args.runs)
        write_text(args.out_dir / "runs.csv", runs.to_csv(index=False))
        write_parquet(args.out_dir / "runs.parquet", runs)
        write_text(args.out_dir / "layers.csv", layers.to_csv(index=False))
        scores = collect_scores(args.runs)
        write_parquet(args.out_dir / "scores.parquet", scores)
        write_parquet(args.out_dir / "expert_counts.parquet", collect_expert_counts(args.runs))
    decode = load_decoder(args.tokenizer) if args.tokenizer else None
    with stage(f"routing analyses ({args.workers} worker(s))"):
        analyses = collect_routing_analyses(args.runs, args.baseline, decode=decode, coactivation_layer=args.layer,
                                            workers=args.workers)
        for name, table in analyses.items():
            write_parquet(args.out_dir / f"{name}.parquet", table)
    with stage("router diagnostics"):
        write_parquet(args.out_dir / "router_diagnostics.parquet", collect_router_diagnostics(args.runs))
    with stage("explorer"):
        write_parquet(args.out_dir / "explorer.parquet",
                      collect_explorer(args.runs, args.explorer_documents, decode, max_tokens=args.explorer_tokens))
    log.info("aggregated %d runs (%d layer rows, %d document scores, co-activation of layer %d, %d analysis "
             "tables) into %s", len(runs), len(layers), len(scores), int(analyses["coactivation"]["layer"].iloc[0]),
             len(analyses), args.out_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
