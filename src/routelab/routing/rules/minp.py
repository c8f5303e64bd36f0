"""``minp``: min-p routing, the experts at least ``m`` times as probable as the most probable one
(min-p sampling, Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent
LLM Outputs", applied to the router distribution)."""

from __future__ import annotations

import torch

from routelab.routing.contract import (
    MAX_K,
    MIN_K,
    WEIGHTS,
    Param,
    Router,
    register_router,
    same_k,
    softmax_float32,
)
from routelab.routing.counting import top_logit_order

M = Param("m", float, 0.1, "keep expert i when p_i >= m * max_j p_j", minimum=0, maximum=1)


def relative_count(top_probs: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """Experts per token whose probability is at least ``ratio`` times the token's largest.

    ``top_probs`` ``[tokens, max_k]`` holds each token's largest probabilities in descending order, so
    the experts that pass are a prefix of it and the count is where the walk down the order first
    fails (Lu et al.'s dynamic skipping) as well as the min-p set cut at ``max_k``. ``[tokens]`` int64.
    """
    return (top_probs >= ratio * top_probs[:, :1]).sum(dim=-1)


class RelativeThresholdRouter(Router):
    """Base of the rules that keep the experts within a factor of the most probable one (minp, ratio):
    subclasses give the factor per layer (:meth:`factor`)."""

    def factor(self, layer: int) -> float:
        raise NotImplementedError

    def rank(self, logits, layer, probs=None):
        order = top_logit_order(logits, self.max_k)  # descending logit is descending probability
        if self.min_k == self.max_k:  # clamped to one k whatever passes
            return order, same_k(logits, self.max_k), None
        probs = softmax_float32(logits) if probs is None else probs
        k = relative_count(probs.gather(-1, order), self.factor(layer)).clamp_(self.min_k, self.max_k)
        return order, k, None


@register_router
class MinPRouter(RelativeThresholdRouter):
    """Every expert whose probability is at least ``m`` times the token's largest, clamped to [min_k, max_k].

    Probabilities are the softmax of the logits in float32; ``m = 0`` keeps ``max_k`` experts, ``m = 1``
    only the most probable (and any exactly as probable), before the clamp.
    """

    method = "minp"
    summary = "min-p: the experts at least m times as probable as the most probable one"
    params = (MIN_K, MAX_K, WEIGHTS, M)

    def __init__(self, num_experts: int, m: float, min_k: int, max_k: int, weights: str = "model"):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        self.m = M.check(m)

    def factor(self, layer):
        return self.m
