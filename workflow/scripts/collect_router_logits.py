#!/usr/bin/env python
"""Stage collect_router_logits: router logits of the unpatched model on the calibration split.

Runs the model (router untouched) over the calibration windows of every dataset and saves each MoE
layer's router logits ``[tokens, experts]`` (padding excluded; subsampled by token to at most
``--max-logits-per-layer`` values per layer with a seeded generator) to one ``.npz``. Every null model
is fitted from this file by calibrate_null, so the model runs once however many nulls are used.

    python workflow/scripts/collect_router_logits.py --model results/demo/model \
        --calibration results/demo/data/*/calibration.parquet --out results/demo/calibration/router_logits.npz
"""

import argparse
import logging
from pathlib import Path

import pandas as pd
import torch

from routelab.calibration import collect_router_logits, save_router_logits
from routelab.cli import run
from routelab.gpus import pin_gpu
from routelab.modeling import load_model, load_tokenizer
from routelab.patching import model_routing_shape

log = logging.getLogger("collect_router_logits")


def main(args: argparse.Namespace) -> None:
    if args.device in ("auto", "cuda"):  # before CUDA starts: one free GPU per job (Snakemake pins none)
        pin_gpu()
    torch.manual_seed(args.seed)
    windows = pd.concat([pd.read_parquet(p) for p in args.calibration], ignore_index=True)
    model = load_model(args.model, args.dtype, args.device, args.experts_implementation)
    num_layers, num_experts, top_k, _ = model_routing_shape(model)
    tokenizer = load_tokenizer(args.model)
    logits = collect_router_logits(model, windows, args.batch_size, tokenizer.pad_token_id or 0,
                                   args.max_logits_per_layer, seed=args.seed)
    save_router_logits(args.out, logits, {"model": str(args.model), "num_layers": num_layers,
                                          "num_experts": num_experts, "top_k": top_k,
                                          "calibration_files": [str(p) for p in args.calibration]})
    log.info("saved router logits of %d layers x %d experts (%d tokens per layer at most) from %d calibration "
             "windows to %s", num_layers, num_experts, max(len(layer) for layer in logits), len(windows), args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--calibration", nargs="+", required=True, type=Path, help="calibration.parquet files")
    parser.add_argument("--out", required=True, type=Path, help="output .npz")
    parser.add_argument("--max-logits-per-layer", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--experts-implementation", default=None)
    parser.add_argument("--seed", type=int, default=0)
    run(main, parser)
