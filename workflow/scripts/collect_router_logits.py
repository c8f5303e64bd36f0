#!/usr/bin/env python
"""Stage collect_router_logits: the selection scores of the model's own routing on the calibration split.

Runs the model (its own top-k) over the calibration windows of every dataset and saves each MoE
layer's selection scores ``[tokens, experts]`` (the router logits of softmax families; padding
excluded; subsampled by token to at most ``--max-logits-per-layer`` values per layer with a seeded
generator) to one ``.npz``. Every null model
is fitted from this file by calibrate_null, so the model runs once however many nulls are used.

    python workflow/scripts/collect_router_logits.py --model results/demo/model \
        --calibration results/demo/data/*/calibration.parquet --out results/demo/calibration/router_logits.npz
"""

import argparse
from pathlib import Path

from routelab.cli import add_model_options, run
from routelab.model.loading import ModelPlacement
from routelab.run.calibration import collect_calibration_logits


def main(args: argparse.Namespace) -> None:
    collect_calibration_logits(args.model, args.calibration, args.out, args.max_logits_per_layer, args.batch_size,
                               ModelPlacement.from_args(args), seed=args.seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--calibration", nargs="+", required=True, type=Path, help="calibration.parquet files")
    parser.add_argument("--out", required=True, type=Path, help="output .npz")
    parser.add_argument("--max-logits-per-layer", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=16)
    add_model_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    run(main, parser)
