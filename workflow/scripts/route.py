#!/usr/bin/env python
"""Stage route: run the model with its router replaced on one dataset; evaluate and record routing.

Writes metrics.json, summary.json, routing.parquet, decisions.parquet, explorer.parquet, scores.parquet,
system.json, provenance.json and tracking/ into --out (one run = one routing config x one dataset); with --shard,
that shard's part for gather_shards.py. Several --data directories with as many --out directories run
one routing config on each dataset in turn, in one process (config `evaluation.route_jobs:
per_routing`), with the same results as one process per run. See routelab.run.route and
docs/outputs.md.

    python workflow/scripts/route.py --model results/demo/model --data results/demo/data/code \
        --null results/demo/calibration/kde/null.npz --out results/demo/runs/bh/code \
        --routing '{"name": "bh", "method": "bh", "alpha": 0.05, "min_k": 1, "max_k": 8}'
"""

import argparse
from dataclasses import fields

from routelab.cli import add_model_options, json_arg, run
from routelab.model.loading import ModelPlacement
from routelab.run.route import RouteJob, run_route


def main(args: argparse.Namespace) -> None:
    if len(args.data) != len(args.out):
        raise ValueError(f"--data and --out: give one run directory per dataset; got {len(args.data)} --data and "
                         f"{len(args.out)} --out directories")
    if args.shard and len(args.data) > 1:
        raise ValueError(f"--shard {args.shard}: a shard is part of one run; got {len(args.data)} --data directories")
    options = {field.name: getattr(args, field.name) for field in fields(RouteJob)
               if field.name not in ("data", "out", "placement")}
    placement = ModelPlacement.from_args(args)
    jobs = [RouteJob(data=data, out=out, placement=placement, **options)  # all checked first
            for data, out in zip(args.data, args.out)]
    for job in jobs:
        run_route(job)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--data", required=True, nargs="+",
                        help="prepared dataset directory (windows.parquet, ...); several: one run each, in turn")
    parser.add_argument("--routing", type=json_arg, required=True, help="routing config as JSON (or @file.json)")
    parser.add_argument("--null", default=None,
                        help="p-value routers: null.npz from calibrate_null, or 'gaussian' (needs no calibration)")
    parser.add_argument("--calibration-logits", default=None,
                        help="rules set up from the calibration split (ratio calibrate, entropy quantiles, layerk "
                             "budget): router_logits.npz from collect_router_logits")
    parser.add_argument("--out", required=True, nargs="+", help="run output directory, one per --data")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="save completed work every N batches to OUT.partial/ and resume from it (0 = one chunk)")
    parser.add_argument("--shard", default=None,
                        help="evaluate only shard I-of-N (whole documents) and write its part for gather_shards.py")
    parser.add_argument("--attempt", type=int, default=1,
                        help="Snakemake's attempt number: a retry after a non-memory error exits at once")
    add_model_options(parser)
    parser.add_argument("--sample-every", type=int, default=100,
                        help="full routing detail for every n-th token into decisions.parquet (0 = none)")
    parser.add_argument("--explorer-documents", type=int, default=3,
                        help="full routing detail for every token of documents 0..N-1 into explorer.parquet, the "
                             "report's token explorer (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    run(main, parser)
