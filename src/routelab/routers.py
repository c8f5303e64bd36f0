"""Routing rules: router logits ``[tokens, experts]`` -> a padded, variable-k expert selection.

Every router returns a :class:`Selection`: ``indices`` and ``weights`` of shape ``[tokens, max_k]``
whose first ``k[t]`` slots hold token ``t``'s experts (most preferred first) and whose unused slots
hold the sentinel index ``num_experts`` with weight 0. Pure tensor code: no Python loop over tokens,
any device, any floating dtype.

Weights are the model's softmax probabilities of the selected experts. The ``weights`` policy says
what happens next: ``model`` renormalises them over the selected experts exactly when the model's
``norm_topk_prob`` says so (OLMoE-1B-7B: no), ``renormalize`` always does, ``none`` never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .nulls import TabulatedNull

WEIGHT_POLICIES = ("model", "renormalize", "none")


class RouterConfigError(ValueError):
    """Router parameters that cannot work for this model."""


@dataclass
class Selection:
    """One layer's routing decisions for a batch of tokens."""

    indices: torch.Tensor  # [tokens, max_k] int64; sentinel num_experts in unused slots
    weights: torch.Tensor  # [tokens, max_k] float32; 0 in unused slots
    k: torch.Tensor  # [tokens] int64; experts selected per token
    pvalues: torch.Tensor | None = None  # [tokens, experts] float32 for p-value routers


class Router:
    """Base class: subclasses implement :meth:`rank` (preference order and k per token)."""

    method: ClassVar[str]
    needs_null: ClassVar[bool] = False

    def __init__(self, num_experts: int, max_k: int, min_k: int = 1, weights: str = "model"):
        if weights not in WEIGHT_POLICIES:
            raise RouterConfigError(f"weights: {weights!r} is not valid; choose one of {', '.join(WEIGHT_POLICIES)}")
        if not 1 <= min_k:
            raise RouterConfigError(f"min_k: {min_k} is not valid; need min_k >= 1")
        if min_k > max_k:
            raise RouterConfigError(f"min_k: {min_k} is greater than max_k = {max_k}; need min_k <= max_k")
        if max_k > num_experts:
            raise RouterConfigError(f"max_k: {max_k} exceeds the model's {num_experts} experts; need max_k <= {num_experts}")
        self.num_experts, self.max_k, self.min_k, self.weight_policy = num_experts, max_k, min_k, weights

    def rank(self, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(order [tokens, max_k], k [tokens], pvalues or None)``; ``order`` most preferred first."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, layer: int = 0, norm_topk_prob: bool = False,
                 probs: torch.Tensor | None = None) -> Selection:
        """Select experts for ``logits`` ``[tokens, experts]`` of MoE layer ``layer``.

        ``probs`` ``[tokens, experts]`` are the probabilities the weights are taken from; default the
        softmax of the logits in float32 (model families that score experts otherwise pass their own).
        """
        if logits.dim() != 2 or logits.shape[-1] != self.num_experts:
            raise ValueError(f"logits: expected shape [tokens, {self.num_experts}], got {tuple(logits.shape)}")
        if probs is None:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        order, k, pvalues = self.rank(logits, layer)
        used = torch.arange(self.max_k, device=logits.device) < k.unsqueeze(-1)
        weights = probs.gather(-1, order) * used
        if self.weight_policy == "renormalize" or (self.weight_policy == "model" and norm_topk_prob):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = order.masked_fill(~used, self.num_experts)
        return Selection(indices=indices, weights=weights, k=k, pvalues=pvalues)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "min_k": self.min_k, "max_k": self.max_k, "weights": self.weight_policy}


class TopKRouter(Router):
    """The standard rule: the ``k`` experts with the largest router probabilities."""

    method = "topk"

    def __init__(self, num_experts: int, k: int, weights: str = "model"):
        if not 1 <= k <= num_experts:
            raise RouterConfigError(f"k: {k} is out of range; valid: 1 <= k <= {num_experts} (the model's experts)")
        super().__init__(num_experts, max_k=k, min_k=k, weights=weights)
        self.k = k

    def rank(self, logits, layer):
        # Same ops as the native routers (softmax in float32, then topk) so ties break identically.
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        order = torch.topk(probs, self.k, dim=-1).indices
        k = torch.full(logits.shape[:1], self.k, dtype=torch.long, device=logits.device)
        return order, k, None


def bh_count(sorted_pvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    """Benjamini-Hochberg step-up count per row: ``max{i : p_(i) <= i * alpha / N}`` (0 if none).

    ``sorted_pvalues`` is ``[tokens, N]`` ascending along the last axis; returns ``[tokens]`` int64.
    """
    n = sorted_pvalues.shape[-1]
    ranks = torch.arange(1, n + 1, device=sorted_pvalues.device, dtype=torch.long)
    thresholds = ranks.to(torch.float64) * (alpha / n)
    passing = sorted_pvalues.to(torch.float64) <= thresholds
    return (passing * ranks).amax(dim=-1)


def order_by_pvalue(pvalues: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Expert order by ascending p-value, ties broken by descending logit. ``[tokens, experts]``."""
    by_logit = torch.argsort(logits, dim=-1, descending=True, stable=True)
    by_p = torch.argsort(pvalues.gather(-1, by_logit), dim=-1, stable=True)
    return by_logit.gather(-1, by_p)


class BHRouter(Router):
    """Adaptive k: BH step-up at level ``alpha`` on p-values against a per-layer null, clamped.

    ``p = sf_null(logit / temperature)``. If fewer than ``min_k`` experts pass, the ``min_k`` with the
    smallest p-values are taken; if more than ``max_k`` pass, the ``max_k`` smallest.
    """

    method = "bh"
    needs_null = True

    def __init__(self, num_experts: int, null: TabulatedNull, alpha: float, min_k: int, max_k: int,
                 temperature: float = 1.0, weights: str = "model"):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        if not 0 < alpha <= 1:
            raise RouterConfigError(f"alpha: {alpha!r} is out of range; valid: 0 < alpha <= 1")
        if not temperature > 0:
            raise RouterConfigError(f"temperature: {temperature!r} is out of range; valid: temperature > 0")
        if null.num_experts != num_experts:
            raise RouterConfigError(
                f"null: fitted for {null.num_experts} experts but the model has {num_experts}; rerun calibrate_null"
            )
        self.null, self.alpha, self.temperature = null, alpha, temperature

    def rank(self, logits, layer):
        pvalues = self.null.pvalues(logits, layer, self.temperature)
        order = order_by_pvalue(pvalues, logits)
        k = bh_count(pvalues.gather(-1, order), self.alpha).clamp(self.min_k, self.max_k)
        return order[:, : self.max_k].contiguous(), k, pvalues

    def describe(self):
        return {**super().describe(), "alpha": self.alpha, "temperature": self.temperature}


ROUTERS: dict[str, type[Router]] = {cls.method: cls for cls in (TopKRouter, BHRouter)}


def build_router(spec: dict, num_experts: int, model_top_k: int, null: TabulatedNull | None = None) -> Router:
    """Instantiate the router a (normalised) routing config describes for a model.

    ``k`` / ``max_k`` left at ``None`` mean the model's own top-k.
    """
    method = spec["method"]
    if method not in ROUTERS:
        raise RouterConfigError(f"method: {method!r} is not a router; choose one of {', '.join(ROUTERS)}")
    if method == "topk":
        return TopKRouter(num_experts, k=spec.get("k") or model_top_k, weights=spec.get("weights", "model"))
    if null is None:
        raise RouterConfigError(f"method {method!r} needs a calibrated null; run calibrate_null first")
    return BHRouter(num_experts, null, alpha=spec["alpha"], min_k=spec.get("min_k", 1),
                    max_k=spec.get("max_k") or model_top_k, temperature=spec.get("temperature", 1.0),
                    weights=spec.get("weights", "model"))
