#!/usr/bin/env python
"""Stage calibrate_null: fit one null model per layer from the collected router logits.

Reads the router logits of the unpatched model (collect_router_logits.py), pools each layer's logits
over experts and tokens, fits the ``--method`` null per layer (kde: a Gaussian KDE; empirical: the
pooled empirical survival function; per_expert: one empirical survival function per expert) and saves
it (``null.npz``, read by p-value routers through ``routelab.nulls.load_null``) with a readable summary
(``null.json``). No model runs here. The gaussian null standardises each token's logits and needs no
calibration, so this stage refuses it.

    python workflow/scripts/calibrate_null.py --logits results/demo/calibration/router_logits.npz \
        --method kde --out results/demo/calibration/kde
"""

import argparse
import logging
from pathlib import Path

from routelab.calibration import load_router_logits
from routelab.cli import run
from routelab.io import write_json
from routelab.nulls import CALIBRATED_METHODS, NULL_METHODS, fit_null

log = logging.getLogger("calibrate_null")


def main(args: argparse.Namespace) -> None:
    if args.method not in CALIBRATED_METHODS:
        raise ValueError(f"--method: {args.method!r} needs no calibration (it standardises each token's logits; "
                         f"route with it directly); calibrate one of {', '.join(CALIBRATED_METHODS)}")
    logits, meta = load_router_logits(args.logits)
    num_experts = meta["num_experts"]
    null = fit_null(args.method, logits, num_experts, grid_size=args.grid_size, quantiles=args.quantiles,
                    meta={"model": meta["model"], "num_layers": meta["num_layers"], "top_k": meta["top_k"],
                          "calibration_files": meta["calibration_files"], "router_logits": str(args.logits)})
    table_size = {"grid_size": args.grid_size} if args.method == "kde" else {"quantiles": args.quantiles}
    out = Path(args.out)
    null.save(out / "null.npz")
    write_json(out / "null.json", {
        **null.meta, "kind": null.kind, "num_experts": num_experts, **table_size, "min_pvalue": null.min_pvalue,
        "layers": [{"layer": i, "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                    "max": float(v.max()), "samples": int(v.size)} for i, v in enumerate(logits)],
    })
    log.info("fitted %s null for %d layers x %d experts from %s", args.method, len(logits), num_experts, args.logits)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logits", required=True, type=Path, help="router_logits.npz from collect_router_logits.py")
    parser.add_argument("--out", required=True, help="output directory (null.npz, null.json)")
    parser.add_argument("--method", choices=NULL_METHODS, default="kde",
                        help=f"null to fit; calibrated ones: {', '.join(CALIBRATED_METHODS)} (default: kde)")
    parser.add_argument("--grid-size", type=int, default=2048, help="kde: points of the tabulated curve")
    parser.add_argument("--quantiles", type=int, default=4096,
                        help="empirical, per_expert: order statistics kept per table")
    run(main, parser)
