#!/usr/bin/env python
"""Stage calibrate_null: per-layer null distributions of router logits from the unpatched model.

Runs the model (router untouched) over the calibration windows of every dataset, pools each layer's
router logits over experts and tokens, fits the ``--method`` null per layer (kde: a Gaussian KDE;
empirical: the pooled empirical survival function; per_expert: one empirical survival function per
expert) and saves it (``null.npz``, read by p-value routers through ``routelab.nulls.load_null``) with a
readable summary (``null.json``). The gaussian null standardises each token's logits and needs no
calibration, so this stage refuses it.

    python workflow/scripts/calibrate_null.py --model results/demo/model \
        --calibration results/demo/data/*/calibration.parquet --out results/demo/calibration
"""

import argparse
import logging
from pathlib import Path

import pandas as pd
import torch

from routelab.calibration import collect_router_logits
from routelab.cli import run
from routelab.gpus import pin_gpu
from routelab.io import write_json
from routelab.modeling import load_model, load_tokenizer
from routelab.nulls import CALIBRATED_METHODS, NULL_METHODS, fit_null
from routelab.patching import model_routing_shape

log = logging.getLogger("calibrate_null")


def main(args: argparse.Namespace) -> None:
    if args.method not in CALIBRATED_METHODS:
        raise ValueError(f"--method: {args.method!r} needs no calibration (it standardises each token's logits; "
                         f"route with it directly); calibrate one of {', '.join(CALIBRATED_METHODS)}")
    if args.device in ("auto", "cuda"):  # before CUDA starts: one free GPU per job (Snakemake pins none)
        pin_gpu()
    torch.manual_seed(args.seed)
    windows = pd.concat([pd.read_parquet(p) for p in args.calibration], ignore_index=True)
    model = load_model(args.model, args.dtype, args.device, args.experts_implementation)
    num_layers, num_experts, top_k, _ = model_routing_shape(model)
    tokenizer = load_tokenizer(args.model)
    logits = collect_router_logits(model, windows, args.batch_size, tokenizer.pad_token_id or 0,
                                   args.max_logits_per_layer, seed=args.seed)
    null = fit_null(args.method, logits, num_experts, grid_size=args.grid_size, quantiles=args.quantiles,
                    meta={"model": str(args.model), "num_layers": num_layers, "top_k": top_k,
                          "calibration_files": [str(p) for p in args.calibration]})
    table_size = {"grid_size": args.grid_size} if args.method == "kde" else {"quantiles": args.quantiles}
    out = Path(args.out)
    null.save(out / "null.npz")
    write_json(out / "null.json", {
        **null.meta, "kind": null.kind, "num_experts": num_experts, **table_size, "min_pvalue": null.min_pvalue,
        "layers": [{"layer": i, "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                    "max": float(v.max()), "samples": int(v.size)} for i, v in enumerate(logits)],
    })
    log.info("fitted %s null for %d layers x %d experts from %d calibration windows", args.method, num_layers,
             num_experts, len(windows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--calibration", nargs="+", required=True, type=Path, help="calibration.parquet files")
    parser.add_argument("--out", required=True, help="output directory (null.npz, null.json)")
    parser.add_argument("--method", choices=NULL_METHODS, default="kde",
                        help=f"null to fit; calibrated ones: {', '.join(CALIBRATED_METHODS)} (default: kde)")
    parser.add_argument("--grid-size", type=int, default=2048, help="kde: points of the tabulated curve")
    parser.add_argument("--quantiles", type=int, default=4096,
                        help="empirical, per_expert: order statistics kept per table")
    parser.add_argument("--max-logits-per-layer", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--experts-implementation", default=None)
    parser.add_argument("--seed", type=int, default=0)
    run(main, parser)
