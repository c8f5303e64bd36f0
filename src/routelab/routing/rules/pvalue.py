"""The base of the p-value rules (``bh``, ``hc``): p-values of the router logits against a null, counted.

Registers no rule itself; :mod:`.bh` and :mod:`.hc` subclass :class:`PValueRouter`.
"""

from __future__ import annotations

import torch

from routelab.routing.contract import LayerPValues, Param, PValueNull, Router, RouterConfigError, same_k
from routelab.routing.counting import order_by_pvalue, top_logit_order
from routelab.routing.nulls import NULL_KINDS

TEMPERATURE = Param("temperature", float, 1.0, "router logits are divided by it before the null CDF",
                    exclusive_minimum=0)
NULL_MODEL = Param("null_model", str, "kde",
                   "null distribution of router logits the p-values are computed against: "
                   + "; ".join(f"{name} = {kind.description}" for name, kind in NULL_KINDS.items()),
                   choices=tuple(NULL_KINDS), router_arg=False)


class PValueRouter(Router):
    """Base of routers that count significant experts in p-values ``p = sf_null(logit / temperature)``.

    Subclasses implement :meth:`count` on p-values sorted ascending; the count is clamped to
    [min_k, max_k] and the experts with the smallest p-values (ties: larger logit first) are taken.
    """

    needs_null = True

    def __init__(self, num_experts: int, null: PValueNull, min_k: int, max_k: int,
                 temperature: float = 1.0, weights: str = "model"):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        self.temperature = TEMPERATURE.check(temperature)
        if null.num_experts is not None and null.num_experts != num_experts:
            raise RouterConfigError(
                f"null: fitted for {null.num_experts} experts but the model has {num_experts}; rerun calibrate_null"
            )
        self.null = null

    @property
    def null_model(self) -> str:
        return self.null.kind

    def count(self, sorted_pvalues: torch.Tensor) -> torch.Tensor:
        """Experts selected per token before clamping, ``[tokens]`` int64."""
        raise NotImplementedError

    def orders_by_probability(self) -> bool:
        # Ascending p is descending logit order (softmax probability) only for a null monotone in the logit.
        return self.null.monotone_in_logit

    def count_unsorted(self, pvalues: torch.Tensor) -> torch.Tensor:
        """:meth:`count` of ``pvalues`` ``[tokens, experts]`` in any order (subclasses may avoid the sort)."""
        return self.count(torch.sort(pvalues, dim=-1).values)

    def rank(self, logits, layer, probs=None):
        pvalues = LayerPValues(self.null, logits, layer, self.temperature)
        if not self.null.monotone_in_logit:
            computed = pvalues()
            order = order_by_pvalue(computed, logits)
            k = self.count(computed.gather(-1, order)).clamp(self.min_k, self.max_k)
            return order[:, : self.max_k].contiguous(), k, computed
        # p falls as the logit rises: ascending p (ties: larger logit first) is descending logit order,
        # and only the first max_k experts of it are needed.
        order = top_logit_order(logits, self.max_k)
        if self.min_k == self.max_k:
            # The count is clamped to k whatever it is: the selection is the top k by logit, and the
            # p-values are computed only if someone reads them (a recorder).
            return order, same_k(logits, self.max_k), pvalues
        count = self.count_from_logits(logits, layer)
        if count is not None:  # counted without p-values: they are computed only if someone reads them
            return order, count.clamp_(self.min_k, self.max_k), pvalues
        computed = pvalues()
        return order, self.count_unsorted(computed).clamp_(self.min_k, self.max_k), computed

    def count_from_logits(self, logits: torch.Tensor, layer: int) -> torch.Tensor | None:
        """The count of :meth:`count_unsorted` decided on the logits themselves, or None where a subclass
        or null cannot (then the p-values are computed and counted)."""
        return None
