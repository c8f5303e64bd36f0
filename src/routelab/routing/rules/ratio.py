"""``ratio``: dynamic expert skipping (Lu et al. 2024, "Not All Experts are Equal: Efficient Expert
Pruning and Skipping for Mixture-of-Experts Large Language Models", ACL): walk a token's top experts
in order and stop at the first whose weight is below ``beta`` times the first's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routelab.routing.contract import (
    MAX_K,
    MIN_K,
    WEIGHTS,
    Alternatives,
    Param,
    RouterConfigError,
    register_router,
)
from routelab.routing.rules.minp import RelativeThresholdRouter
from routelab.routing.statistics import check_layer_count, second_to_first

BETA = Param("beta", float, None, "skip the experts after the first whose weight is below beta * w_1",
             minimum=0, maximum=1)
CALIBRATE = Param("calibrate", str, None, "median = per layer, beta is the median of w_2 / w_1 over the "
                  "calibration split (the paper's choice)", choices=("median",), calibrated=True)


@register_router
class RatioRouter(RelativeThresholdRouter):
    """The top ``max_k`` experts in descending probability, cut before the first expert ``j`` with
    ``w_j < beta * w_1``, clamped to [min_k, max_k].

    ``beta`` is one number for every layer, or with ``calibrate: median`` one per layer: the median of
    ``w_2 / w_1`` over the calibration tokens, so about half of the tokens skip their second expert (the
    paper's setting for Mixtral's top-2). For a fixed ``beta`` the selection equals ``minp`` with
    ``m = beta`` cut at the same ``max_k`` (the walk stops where the descending weights first fail the
    bound, and every later weight fails it too).
    """

    method = "ratio"
    summary = "dynamic skipping: the top experts in order until one's weight falls below beta times the first's"
    params = (MIN_K, MAX_K, WEIGHTS, BETA, CALIBRATE)
    alternatives = (Alternatives(("beta", "calibrate"), {"calibrate": "median"}),)

    def __init__(self, num_experts: int, min_k: int, max_k: int, weights: str = "model", beta: float | None = None,
                 calibrate: str | None = None, calibration: Sequence[np.ndarray] | None = None):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        if (beta is None) == (calibrate is None):
            raise RouterConfigError(f"ratio: give exactly one of beta and calibrate (got beta={beta!r}, "
                                    f"calibrate={calibrate!r})")
        self.calibrate = None if calibrate is None else CALIBRATE.check(calibrate)
        if beta is not None:
            self.beta, self.layer_betas = BETA.check(beta), None
            return
        if calibration is None:
            raise RouterConfigError("ratio: calibrate: median needs the calibration split's router logits")
        layers = check_layer_count(calibration, "ratio calibrate")
        self.layer_betas = [float(np.median(second_to_first(values, layer, num_experts)))
                            for layer, values in enumerate(layers)]
        self.beta = self.layer_betas  # what describe() reports: the fitted value of every layer

    def check_layers(self, num_layers):
        if self.layer_betas is not None and len(self.layer_betas) != num_layers:
            raise RouterConfigError(f"ratio: beta was calibrated for {len(self.layer_betas)} MoE layers but the model "
                                    f"has {num_layers}; recollect the calibration logits for this model")

    def factor(self, layer):
        return self.beta if self.layer_betas is None else self.layer_betas[layer]
