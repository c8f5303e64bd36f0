"""``layerk``: a fixed k per MoE layer (LExI, "Layer-Adaptive Active Experts for Efficient MoE Model
Inference", arXiv 2509.02753): the given list, or a total budget spread over the layers by how
uncertain each layer's router is on the calibration split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from routelab.routing.contract import (
    MAX_K,
    MIN_K,
    WEIGHTS,
    Alternatives,
    Param,
    Router,
    RouterConfigError,
    register_router,
    same_k,
)
from routelab.routing.counting import top_logit_order
from routelab.routing.statistics import check_layer_count, layer_entropies

# The configured bounds of every layer's k; the router's own min_k / max_k are the smallest and largest k.
LOWEST = replace(MIN_K, description="fewest experts per token in any layer", attribute="lowest_k")
HIGHEST = replace(MAX_K, description="most experts per token in any layer; null = the model's top-k",
                  attribute="highest_k")
KS = Param("ks", list, None, "experts per token in each MoE layer, one k per layer in layer order", minimum=1,
           item_type=int, expert_count=True)
BUDGET = Param("budget", int, None, "experts per token summed over all MoE layers, spread over the layers in "
               "proportion to their router perplexity on the calibration split", minimum=1, calibrated=True)


def spread_budget(weights: np.ndarray, budget: int, min_k: int, max_k: int) -> list[int]:
    """Integers ``k_l`` in ``[min_k, max_k]`` summing to ``budget`` (clipped to what the bounds allow), as
    close to proportional to ``weights`` as the bounds let them be.

    The real shares are ``clip(c * w_l, min_k, max_k)`` with the one scale ``c`` at which they sum to the
    budget (their sum rises with ``c``: bisection), then rounded by largest remainder (ties: the lower
    layer), which keeps the bounds because they are integers. Deterministic.
    """
    weights = np.asarray(weights, dtype=np.float64)
    budget = int(np.clip(budget, weights.size * min_k, weights.size * max_k))
    low, high = 0.0, max_k / weights.min()  # at high every share is max_k
    for _ in range(200):
        scale = (low + high) / 2
        low, high = (scale, high) if np.clip(scale * weights, min_k, max_k).sum() < budget else (low, scale)
    share = np.clip(high * weights, min_k, max_k)
    ks = np.floor(share + 1e-9).astype(np.int64)
    remainders = share - ks
    missing = budget - int(ks.sum())
    for layer in sorted(range(weights.size), key=lambda i: (-remainders[i], i)):
        if missing <= 0:
            break
        if ks[layer] < max_k:
            ks[layer] += 1
            missing -= 1
    return ks.tolist()


@register_router
class LayerKRouter(Router):
    """The ``k_l`` most probable experts in MoE layer ``l``, the same for every token of the layer.

    ``ks`` lists the ``k_l``; or ``budget`` B (experts per token over all layers) gives
    ``k_l ∝ exp(mean entropy of layer l's router on the calibration split)``, the layer's router
    perplexity (the number of experts its router effectively spreads over), clamped to [min_k, max_k]
    and rounded to integers summing to B. LExI itself fits the ks by its own per-layer sensitivity
    search; its published allocations can be given as ``ks``.
    """

    method = "layerk"
    summary = "per-layer k: a fixed k for each MoE layer, given or spread from a budget over the layers"
    params = (LOWEST, HIGHEST, WEIGHTS, KS, BUDGET)
    alternatives = (Alternatives(("ks", "budget"), None),)

    def __init__(self, num_experts: int, min_k: int, max_k: int, weights: str = "model", ks: list[int] | None = None,
                 budget: int | None = None, calibration: Sequence[np.ndarray] | None = None):
        if (ks is None) == (budget is None):
            raise RouterConfigError(f"layerk: give exactly one of ks and budget (got ks={ks!r}, budget={budget!r})")
        Router.__init__(self, num_experts, max_k=max_k, min_k=min_k, weights=weights)  # checks the bounds
        self.lowest_k, self.highest_k = self.min_k, self.max_k
        bounds = (self.min_k, self.max_k)
        self.budget, self.perplexity = budget, None
        if ks is not None:
            ks = KS.check(ks)
            if not all(bounds[0] <= k <= bounds[1] for k in ks):
                raise RouterConfigError(f"ks: {ks!r} is not valid; each k must be in [min_k, max_k] = "
                                        f"[{bounds[0]}, {bounds[1]}]")
        else:
            self.budget = BUDGET.check(budget)
            if calibration is None:
                raise RouterConfigError("layerk: budget needs the calibration split's router logits")
            layers = check_layer_count(calibration, "layerk budget")
            self.perplexity = [float(np.exp(layer_entropies(values, layer, num_experts).mean()))
                               for layer, values in enumerate(layers)]
            ks = spread_budget(np.asarray(self.perplexity), self.budget, *bounds)
        self.ks = ks
        # The selection is as wide as the widest layer; a narrower layer's slots past its k are sentinels.
        self.min_k, self.max_k = min(ks), max(ks)

    def check_layers(self, num_layers):
        if len(self.ks) != num_layers:
            source = "ks" if self.budget is None else "the calibration logits"
            raise RouterConfigError(f"ks: {len(self.ks)} values (from {source}) but the model has {num_layers} MoE "
                                    f"layers; need one k per layer")

    def rank(self, logits, layer, probs=None):
        k = same_k(logits, self.ks[layer])
        return top_logit_order(logits, self.max_k), k, None
