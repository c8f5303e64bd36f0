"""``seqtopk``: sequence-level top-k (SeqTopK, arXiv 2511.06494): the window's ``T * budget`` most
probable (token, expert) pairs, so the experts a window is given go to the tokens that need them.

It sees every token of a window at once, so it is a teacher-forced rule: it routes evaluation of
whole windows, and refuses decode steps of generation, where the tokens after the current one do
not exist yet."""

from __future__ import annotations

import torch

from routelab.routing.contract import (
    MAX_K,
    MIN_K,
    WEIGHTS,
    Param,
    Router,
    RouterConfigError,
    register_router,
    same_k,
    softmax_float32,
)
from routelab.routing.counting import top_logit_order

BUDGET = Param("budget", float, None, "experts per token on average over the window (the window selects "
               "round(T * budget) pairs of its T tokens); null = the model's top-k", exclusive_minimum=0,
               model_top_k=True, expert_count=True)


def window_counts(top_probs: torch.Tensor, real: torch.Tensor, budget: float, min_k: int) -> torch.Tensor:
    """Experts per token when each window keeps its ``round(T * budget)`` most probable (token, expert)
    pairs, every token at least ``min_k`` and at most ``max_k`` (the width of ``top_probs``).

    ``top_probs`` ``[windows, T, max_k]``: each token's largest probabilities, descending; ``real``
    ``[windows, T]`` bool (padding takes no share; ``T`` counts real tokens). The ``min_k`` first pairs
    of every real token are kept; the rest of the budget goes to the largest of the remaining pairs
    (ties: the earlier token, then the earlier slot, so a token's kept pairs are a prefix of its order).
    Returns ``[windows, T]`` int64 (``min_k`` for padding).
    """
    windows, length, width = top_probs.shape
    tokens = real.sum(dim=-1)
    target = torch.round(tokens.double() * budget).long()
    extra = (target - tokens * min_k).clamp_(min=0)
    candidates = top_probs[:, :, min_k:].masked_fill(~real.unsqueeze(-1), -1.0).reshape(windows, -1)
    order = torch.sort(candidates, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    kept = (rank < extra.unsqueeze(-1)) & (candidates >= 0)
    return min_k + kept.view(windows, length, width - min_k).sum(dim=-1)


@register_router
class SeqTopKRouter(Router):
    """Per window (one sequence of the batch), the ``round(T * budget)`` most probable (token, expert)
    pairs, each token at least ``min_k`` and at most ``max_k`` experts; ``budget`` = the model's k with
    ``max_k`` above it moves experts from confident tokens to uncertain ones at the same total.

    The windows are the batch's sequences, told by :meth:`begin_forward` (which
    :func:`routelab.model.install_router` calls); called directly, all tokens are one window. Raises
    :class:`RouterConfigError` on a decode step (tokens already in the KV cache): the rule is not causal.
    """

    method = "seqtopk"
    summary = "sequence-level top-k: the window's T * budget most probable (token, expert) pairs (teacher-forced)"
    params = (MIN_K, MAX_K, WEIGHTS, BUDGET)
    teacher_forced = True

    def __init__(self, num_experts: int, budget: float, min_k: int, max_k: int, weights: str = "model"):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        self.budget = BUDGET.check(budget)
        self._windows: tuple[int, int] | None = None
        self._mask: torch.Tensor | None = None

    def begin_forward(self, sequences, length, attention_mask, cached):
        if cached:
            raise RouterConfigError(
                f"seqtopk: a decode step ({cached} tokens already in the KV cache); seqtopk chooses among all "
                "tokens of a window at once (teacher-forced), so it cannot route generation; use a causal rule")
        self._windows = (sequences, length)
        # A 2-D padding mask says which tokens are real; a 4-D (already expanded) mask does not: all real.
        self._mask = attention_mask[:, -length:].bool() if attention_mask is not None and attention_mask.dim() == 2 \
            else None

    def rank(self, logits, layer, probs=None):
        probs = softmax_float32(logits) if probs is None else probs
        order = top_logit_order(logits, self.max_k)
        tokens = logits.shape[0]
        windows, length = self._windows if self._windows is not None else (1, tokens)
        if windows * length != tokens:
            raise ValueError(f"seqtopk: {tokens} tokens in the layer but the forward had {windows} x {length}")
        real = (self._mask.to(logits.device) if self._mask is not None
                else torch.ones(windows, length, dtype=torch.bool, device=logits.device))
        if self.min_k == self.max_k:
            k = same_k(logits, self.max_k)
        else:
            top = probs.gather(-1, order).view(windows, length, self.max_k)
            k = window_counts(top, real, self.budget, self.min_k).view(-1)
        return order, k, None
