#!/usr/bin/env python
"""Stage calibrate_null: fit one null model per layer from the collected router logits.

Reads the router logits of the unpatched model (collect_router_logits.py), pools each layer's logits
over experts and tokens, fits the ``--method`` null per layer (kde: a Gaussian KDE; empirical: the
pooled empirical survival function; student_t: a location-scale t by maximum likelihood; gmm: a
Gaussian mixture chosen by BIC; per_expert: one empirical survival function per expert) and saves
it (``null.npz``, read by p-value routers through ``routelab.routing.nulls.load_null``) with a readable summary
(``null.json``). No model runs here. The gaussian null standardises each token's logits and needs no
calibration, so this stage refuses it.

    python workflow/scripts/calibrate_null.py --logits results/demo/calibration/router_logits.npz \
        --method kde --out results/demo/calibration/kde
"""

import argparse
from pathlib import Path

from routelab.cli import run
from routelab.routing.nulls import NULL_KINDS, calibrated_kinds
from routelab.run.calibration import calibrate_null


def main(args: argparse.Namespace) -> None:
    calibrate_null(args.logits, args.method, args.out, grid_size=args.grid_size, quantiles=args.quantiles)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logits", required=True, type=Path, help="router_logits.npz from collect_router_logits.py")
    parser.add_argument("--out", required=True, help="output directory (null.npz, null.json)")
    parser.add_argument("--method", choices=list(NULL_KINDS), default="kde",
                        help=f"null to fit; calibrated ones: {', '.join(calibrated_kinds())} (default: kde)")
    parser.add_argument("--grid-size", type=int, default=2048,
                        help="kde, student_t, gmm: points of the tabulated curve")
    parser.add_argument("--quantiles", type=int, default=4096,
                        help="empirical, per_expert: order statistics kept per table")
    run(main, parser)
