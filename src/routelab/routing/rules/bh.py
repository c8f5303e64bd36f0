"""``bh``: Benjamini-Hochberg adaptive k on p-values of the router logits against a calibrated null."""

from __future__ import annotations

import torch

from routelab.routing.contract import MAX_K, MIN_K, WEIGHTS, Param, PValueNull, register_router
from routelab.routing.counting import (
    FirstPassingRank,
    bh_count,
    bh_count_unsorted,
    bh_pvalue_cuts,
    count_passing,
    logit_cuts,
)
from routelab.routing.rules.pvalue import NULL_MODEL, TEMPERATURE, PValueRouter

ALPHA = Param("alpha", float, 0.05, "BH false-discovery level", exclusive_minimum=0, maximum=1)


@register_router
class BHRouter(PValueRouter):
    """Adaptive k: BH step-up at level ``alpha`` on p-values against a per-layer null, clamped.

    ``p = sf_null(logit / temperature)``, ``k = max{i : p_(i) <= i * alpha / N}``. If fewer than
    ``min_k`` experts pass, the ``min_k`` with the smallest p-values are taken; if more than ``max_k``
    pass, the ``max_k`` smallest. A pooled per-layer null makes this a calibrated heuristic for
    choosing k, not a false-discovery-rate guarantee.
    """

    method = "bh"
    summary = "Benjamini-Hochberg adaptive k: the experts whose p-values pass BH step-up at level alpha"
    params = (MIN_K, MAX_K, WEIGHTS, TEMPERATURE, ALPHA, NULL_MODEL)

    def __init__(self, num_experts: int, null: PValueNull, alpha: float, min_k: int, max_k: int,
                 temperature: float = 1.0, weights: str = "model"):
        super().__init__(num_experts, null, min_k=min_k, max_k=max_k, temperature=temperature, weights=weights)
        self.alpha = ALPHA.check(alpha)
        self._first_rank: dict[tuple[str, int], FirstPassingRank] = {}  # per (device, layer)

    @property
    def bh_level(self) -> float:
        return self.alpha

    def count(self, sorted_pvalues):
        return bh_count(sorted_pvalues, self.alpha)

    def count_unsorted(self, pvalues):
        return bh_count_unsorted(pvalues, self.alpha)

    def count_from_logits(self, logits, layer):
        """BH in logit space, for a null whose p-value is one non-increasing function of the logit per
        layer (``pointwise_in_logit``; kde and empirical): ``p <= c_i`` is ``logit >= x_i``, with the cuts
        ``x_i`` found once per layer and device by :func:`logit_cuts` on the null's own p-values, so the
        count equals :func:`bh_count_unsorted` of the p-values exactly while computing none of them."""
        if not self.null.pointwise_in_logit:
            return None
        key = (str(logits.device), layer)
        if key not in self._first_rank:
            def pvalue_of(x: torch.Tensor) -> torch.Tensor:
                return self.null.pvalues(x.view(1, -1), layer, self.temperature).view(-1)

            cuts = logit_cuts(pvalue_of, bh_pvalue_cuts(self.num_experts, self.alpha, logits.device))
            self._first_rank[key] = FirstPassingRank(cuts)
        first_rank = self._first_rank[key]
        return count_passing(first_rank(logits)) if first_rank.usable else None
