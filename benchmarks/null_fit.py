#!/usr/bin/env python
"""Time fitting each calibrated null on OLMoE-sized synthetic calibration logits.

16 layers x 1M logits ([15625 tokens, 64 experts]) per layer, drawn from a per-layer mixture of two
normals with per-expert offsets (some experts habitually loud). Prints one line per method (every
calibrated kind: kde, empirical, student_t, gmm, per_expert) with the fit time, the time per layer and
its ratio to the 30 s target, and for the parametric kinds what was fitted; data generation is not
timed. Pins itself to 2 CPU cores where the OS allows, as the calibrate_null rule asks for 2 threads.

    python benchmarks/null_fit.py [--layers 16 --logits-per-layer 1000000 --experts 64] [--methods gmm ...]
"""

import argparse
import os
import time

import numpy as np

from routelab.routing.nulls import calibrated_kinds, fit_null

TARGET_S = 30.0


def synthetic_layers(layers: int, tokens: int, experts: int, seed: int) -> list[np.ndarray]:
    """``[tokens, experts]`` float32 per layer: 70/30 mixture of N(0, 1) and N(2, 0.5) plus expert offsets."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(layers):
        loud = rng.random((tokens, experts)) < 0.3
        values = np.where(loud, rng.normal(2.0, 0.5, (tokens, experts)), rng.standard_normal((tokens, experts)))
        result.append((values + rng.normal(0, 0.5, experts)).astype(np.float32))
    return result


def fitted_summary(meta: dict) -> str:
    """What a parametric null fitted per layer, in a few words (empty for the other kinds)."""
    fits = meta.get("layer_fits", [])
    if meta.get("method") == "student_t":
        df = [fit["df"] for fit in fits]
        return f"  df {min(df):.3g}..{max(df):.3g} (fitted on {fits[0]['fit_samples']} values per layer)"
    if meta.get("method") == "gmm":
        return f"  components per layer {[fit['components'] for fit in fits]}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--logits-per-layer", type=int, default=1_000_000)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--grid-size", type=int, default=2048)
    parser.add_argument("--quantiles", type=int, default=4096)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=calibrated_kinds(), default=list(calibrated_kinds()))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[: args.cores])
    tokens = args.logits_per_layer // args.experts
    layers = synthetic_layers(args.layers, tokens, args.experts, args.seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# {args.layers} layers x {tokens * args.experts} logits ([{tokens}, {args.experts}]), {cores} cores, "
          f"grid_size {args.grid_size}, quantiles {args.quantiles}")
    for method in args.methods:
        start = time.perf_counter()
        null = fit_null(method, layers, args.experts, grid_size=args.grid_size, quantiles=args.quantiles)
        seconds = time.perf_counter() - start
        size_mb = (null.grid.nbytes + null.sf.nbytes) / 2**20
        print(f"{method:<11} fit {seconds:6.2f} s, {seconds / args.layers:5.2f} s per layer  "
              f"({seconds / TARGET_S:.3f} of the {TARGET_S:.0f} s target)  tables {size_mb:.1f} MiB"
              + fitted_summary(null.meta))


if __name__ == "__main__":
    main()
