"""``topk``: the model's own rule, with any fixed k."""

from __future__ import annotations

from numbers import Integral

import torch

from routelab.routing.contract import (
    WEIGHTS,
    Param,
    Router,
    RouterConfigError,
    register_router,
    same_k,
)


@register_router
class TopKRouter(Router):
    """The standard rule: the ``k`` experts with the largest selection scores (softmax families: the largest
    router probabilities; DeepSeek-V3 class: ``sigmoid(logit) + bias`` among the candidate groups)."""

    method = "topk"
    summary = "fixed k: the k experts with the largest router probabilities (the model's own rule)"
    params = (
        Param("k", int, None, "experts per token; null = the model's top-k", minimum=1, model_top_k=True,
              expert_count=True),
        WEIGHTS,
    )

    def __init__(self, num_experts: int, k: int, weights: str = "model"):
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= num_experts:
            raise RouterConfigError(f"k: {k!r} is out of range; valid: 1 <= k <= {num_experts} (the model's experts)")
        super().__init__(num_experts, max_k=k, min_k=k, weights=weights)
        self.k = int(k)

    def rank(self, logits, layer, probs=None):
        # One topk over the selection scores, as the native routers do (softmax is monotone: the softmax
        # families' topk over probabilities selects the same experts).
        order = torch.topk(logits, self.k, dim=-1).indices
        k = same_k(logits, self.k)
        return order, k, None
