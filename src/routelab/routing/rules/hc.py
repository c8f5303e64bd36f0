"""``hc``: higher-criticism adaptive k (Donoho & Jin 2004) on the p-values the ``bh`` rule uses."""

from __future__ import annotations

from routelab.routing.contract import MAX_K, MIN_K, WEIGHTS, Param, PValueNull, register_router
from routelab.routing.counting import hc_count
from routelab.routing.rules.pvalue import NULL_MODEL, TEMPERATURE, PValueRouter

ALPHA0 = Param("alpha0", float, 0.5, "higher criticism searches the smallest alpha0 * N p-values",
               exclusive_minimum=0, maximum=1)


@register_router
class HCRouter(PValueRouter):
    """Adaptive k by higher criticism on the same p-values as :class:`~routelab.routing.rules.bh.BHRouter`.

    ``k`` is the HC-maximising rank among the ``alpha0`` fraction of smallest p-values
    (:func:`~routelab.routing.counting.hc_count`; the threshold is ``p_(k)``), clamped to
    [min_k, max_k]. Unlike BH there is no level: HC picks where the excess of small p-values over the
    uniform is most significant.
    """

    method = "hc"
    summary = "higher criticism: k where the excess of small p-values over the uniform is most significant"
    params = (MIN_K, MAX_K, WEIGHTS, TEMPERATURE, ALPHA0, NULL_MODEL)

    def __init__(self, num_experts: int, null: PValueNull, min_k: int, max_k: int,
                 temperature: float = 1.0, weights: str = "model", alpha0: float = 0.5):
        super().__init__(num_experts, null, min_k=min_k, max_k=max_k, temperature=temperature, weights=weights)
        self.alpha0 = ALPHA0.check(alpha0)

    def count(self, sorted_pvalues):
        return hc_count(sorted_pvalues, self.alpha0)
