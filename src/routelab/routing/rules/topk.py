"""``topk``: the model's own rule, with any fixed k, and its drop-the-best ablation (``skip_top``)."""

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
    router probabilities; DeepSeek-V3 class: ``sigmoid(logit) + bias`` among the candidate groups).

    ``skip_top = s`` leaves out the ``s`` best of those ``k`` (ranks ``s + 1 .. k``, so ``k - s`` experts,
    each with its native weight): the ablation that shows how much the model leans on its top expert.
    """

    method = "topk"
    summary = "fixed k: the k experts with the largest router probabilities (the model's own rule)"
    params = (
        Param("k", int, None, "experts per token; null = the model's top-k", minimum=1, model_top_k=True,
              expert_count=True),
        Param("skip_top", int, 0, "leave out this many of the k best experts (1 = the model's top-k without "
              "its top-1 expert: the drop-top-1 ablation); the rest keep their weights", minimum=0),
        WEIGHTS,
    )

    def __init__(self, num_experts: int, k: int, weights: str = "model", skip_top: int = 0):
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= num_experts:
            raise RouterConfigError(f"k: {k!r} is out of range; valid: 1 <= k <= {num_experts} (the model's experts)")
        if isinstance(skip_top, bool) or not isinstance(skip_top, Integral) or not 0 <= skip_top < k:
            raise RouterConfigError(f"skip_top: {skip_top!r} is out of range; valid: 0 <= skip_top < k = {k} "
                                    "(at least one expert must stay)")
        super().__init__(num_experts, max_k=k - skip_top, min_k=k - skip_top, weights=weights)
        self.k, self.skip_top = int(k), int(skip_top)

    @classmethod
    def check_values(cls, values):
        super().check_values(values)
        k, skip_top = values.get("k"), values.get("skip_top") or 0
        if k is not None and skip_top >= k:  # known before any model is loaded (k null: when it is built)
            raise RouterConfigError(f"skip_top: {skip_top!r} is out of range; valid: 0 <= skip_top < k = {k} "
                                    "(at least one expert must stay)")

    def rank(self, logits, layer, probs=None):
        # One topk over the selection scores, as the native routers do (softmax is monotone: the softmax
        # families' topk over probabilities selects the same experts).
        order = torch.topk(logits, self.k, dim=-1).indices[:, self.skip_top:]
        k = same_k(logits, self.k - self.skip_top)
        return order, k, None

    def orders_by_probability(self) -> bool:
        return self.skip_top == 0  # without its best experts, the first slot is not the most probable
