"""``topp``: top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models")."""

from __future__ import annotations

from routelab.routing.contract import MAX_K, MIN_K, WEIGHTS, Param, Router, register_router, same_k, softmax_float32
from routelab.routing.counting import top_logit_order, top_p_count

P = Param("p", float, 0.4, "cumulative router probability the selected experts must reach", exclusive_minimum=0,
          maximum=1)


@register_router
class TopPRouter(Router):
    """The most probable experts until their cumulative probability reaches ``p``, the crossing expert
    included, clamped to [min_k, max_k].

    Probabilities are the softmax of the logits in float32, ordered by descending logit (ties: lower
    expert index first); ``k`` is :func:`~routelab.routing.counting.top_p_count` on the first ``max_k``
    of them (a crossing further down is clamped to ``max_k`` anyway). ``p = 1`` selects ``max_k``
    experts for every token.
    """

    method = "topp"
    summary = "top-p: the smallest set of most probable experts whose probability reaches p"
    params = (MIN_K, MAX_K, WEIGHTS, P)

    def __init__(self, num_experts: int, p: float, min_k: int, max_k: int, weights: str = "model"):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        self.p = P.check(p)

    def rank(self, logits, layer, probs=None):
        # Only the first max_k experts are needed: a crossing past them is clamped to max_k anyway.
        order = top_logit_order(logits, self.max_k)
        if self.min_k == self.max_k:
            return order, same_k(logits, self.max_k), None
        probs = softmax_float32(logits) if probs is None else probs
        k = top_p_count(probs.gather(-1, order), self.p).clamp_(self.min_k, self.max_k)
        return order, k, None
