"""What one MoE layer's native router computes from its logits, in the terms every routing rule takes.

A family's router ranks experts by a *selection score* (softmax families: the logits; DeepSeek-V3
class: ``sigmoid(logit) + e_score_correction_bias``), may first limit the choice to *candidate*
experts (group-limited selection: the best ``topk_group`` of ``n_group`` groups), and mixes the
selected experts with *mixing scores* (the softmax probabilities, or the sigmoid scores) that may be
renormalised and scaled. :class:`LayerScores` carries the three apart, plus the probabilities that
probability-based rules (top-p, min-p, entropy, ...) count on: the family's scores normalised over the
candidates (softmax families: the softmax itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below every float32 probability's log: the floor of softmax_logits where a probability is 0 (an expert
# outside the candidate groups), so entropy sums see 0 x floor = 0 instead of 0 x -inf = NaN.
_LOG_FLOOR = float(torch.finfo(torch.float32).min) / 4


@dataclass
class LayerScores:
    """One layer's router output for ``T`` tokens and ``E`` experts (all ``[T, E]``).

    ``ranked`` is what rules rank and p-value nulls are evaluated on (``-inf`` outside the candidates);
    ``probs`` float32, summing to 1 over the candidates; ``mixing`` the scores the selected experts'
    weights are taken from (None: ``probs``); ``scores`` the selection scores before the candidate mask
    and ``softmax_logits`` logits whose softmax is ``probs`` (both None where they are the router logits:
    softmax families without a bias). ``probability_order``: descending ``ranked`` is descending ``probs``.
    """

    ranked: torch.Tensor
    probs: torch.Tensor
    mixing: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    softmax_logits: torch.Tensor | None = None
    probability_order: bool = True


def group_candidates(scores: torch.Tensor, num_groups: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Boolean ``[T, E]``: the experts of each token's best ``topk_group`` of ``num_groups`` contiguous
    expert groups, with the native routers' own operations (so ties break as theirs do).

    ``group_score`` ``top2_sum`` ranks a group by the sum of its two best scores (DeepSeek-V3), ``max``
    by its best score (DeepSeek-V2's group-limited greedy).
    """
    tokens, experts = scores.shape
    grouped = scores.view(-1, num_groups, experts // num_groups)
    if group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, num_groups, experts // num_groups).reshape(tokens, experts).bool()


def softmax_scores(logits: torch.Tensor, bias: torch.Tensor | None, candidates: torch.Tensor | None) -> LayerScores:
    """Scores of a softmax router: probabilities ``softmax(logits)`` in float32; with a selection bias
    (ERNIE 4.5's ``moe_statics``) the rank is ``probs + bias``; candidates limit both."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if bias is None and candidates is None:
        return LayerScores(ranked=logits, probs=probs)
    scores = logits if bias is None else probs + bias
    mixing = probs
    if candidates is not None:
        probs = _within(probs, candidates)
    return LayerScores(ranked=_masked(scores, candidates), probs=probs, mixing=mixing,
                       scores=None if bias is None else scores, softmax_logits=_log(probs),
                       probability_order=bias is None)


def sigmoid_scores(logits: torch.Tensor, bias: torch.Tensor | None, candidates: torch.Tensor | None,
                   mixing_float32: bool, rank_logits: bool) -> LayerScores:
    """Scores of a sigmoid router: mixing scores ``sigmoid(logit)`` (computed in float32 or in the logits'
    dtype, as the family does), selection scores ``sigmoid + bias`` (``rank_logits``: the logits
    themselves, for routers that take the top-k of the logits and no bias), probabilities the sigmoid
    scores normalised over the candidates."""
    sigmoid = torch.sigmoid(logits.float() if mixing_float32 else logits)
    scores = sigmoid if bias is None else sigmoid + bias
    probs = sigmoid.float()
    probs = probs / probs.sum(dim=-1, keepdim=True) if candidates is None else _within(probs, candidates)
    ranked = logits if rank_logits and bias is None and candidates is None else _masked(scores, candidates)
    return LayerScores(ranked=ranked, probs=probs, mixing=sigmoid, scores=None if ranked is logits else scores,
                       softmax_logits=_log(probs), probability_order=bias is None)


def _within(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    kept = probs * candidates
    return kept / kept.sum(dim=-1, keepdim=True)


def _masked(scores: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    return scores if candidates is None else scores.masked_fill(~candidates, float("-inf"))


def _log(probs: torch.Tensor) -> torch.Tensor:
    return probs.log().clamp_(min=_LOG_FLOOR)
