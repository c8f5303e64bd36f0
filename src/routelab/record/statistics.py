"""Routing statistics: reduce the recorder's per-layer running counts and sums to summary.json.

The recorder accumulates, per MoE layer and over real (non-padding) tokens, sums of per-token values
(:class:`RouterSums`); the functions here turn one layer's sums into one statistic each. Per-token
definitions, with ``p = softmax(logits)`` over all ``E`` experts:

- weight entropy: entropy in nats of the selected experts' weights renormalised to sum to 1
  (0 for a token with one expert);
- router entropy: entropy in nats of ``p``;
- z: ``logsumexp(logits) ** 2`` (ST-MoE router z-loss);
- top-1 margin: ``p_(1) - p_(2)``, the two largest probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Keys that every per-layer entry and the top level of the summary carry (None when not recorded).
ROUTER_STAT_KEYS = ("weight_entropy", "router_entropy", "weight_entropy_norm", "router_entropy_norm",
                    "load_balancing_loss", "router_z_loss", "top1_margin")


@dataclass(frozen=True)
class RouterSums:
    """Per-layer sums over real tokens; every array's first axis is the layer."""

    tokens: np.ndarray  # [layers] real tokens seen
    weight_entropy: np.ndarray  # [layers] sum of per-token weight entropies, nats
    router_entropy: np.ndarray  # [layers] sum of per-token router entropies, nats
    logsumexp_squared: np.ndarray  # [layers] sum of logsumexp(logits) ** 2
    top1_margin: np.ndarray  # [layers] sum of p_(1) - p_(2)
    router_probs: np.ndarray  # [layers, E] sum of softmax probabilities per expert
    top1_counts: np.ndarray  # [layers, E] tokens whose most probable expert is e


def weight_entropy(entropy_sum: float, tokens: float) -> float:
    """Mean over tokens of the entropy of the renormalised selected weights, nats (0..log k)."""
    return float(entropy_sum / tokens)


def router_entropy(entropy_sum: float, tokens: float) -> float:
    """Mean over tokens of the entropy of softmax(logits) over all experts, nats (0..log E)."""
    return float(entropy_sum / tokens)


def normalized_entropy(entropy_nats: float, num_experts: int) -> float:
    """An entropy in nats divided by log(num_experts): 1 is uniform over all experts (dimensionless)."""
    return float(entropy_nats / math.log(num_experts))


def load_balancing_loss(selection_counts: np.ndarray, router_prob_sums: np.ndarray, tokens: float) -> float:
    """Switch-Transformer auxiliary loss of one layer, ``E * sum_e f_e * P_e`` (dimensionless).

    ``selection_counts [E]``: how often expert e was selected; ``router_prob_sums [E]``: summed softmax
    probability of e; both over the same ``tokens``. ``f_e = count_e / tokens`` (so ``sum_e f_e`` is
    the mean k) and ``P_e = prob_sum_e / tokens``, exactly as transformers' ``load_balancing_loss_func``
    for one layer; with the actual (variable-k) selection in place of a fixed top-k. Uniform routing of
    a fixed k gives k.
    """
    num_experts = len(selection_counts)
    f = np.asarray(selection_counts, dtype=np.float64) / tokens
    p = np.asarray(router_prob_sums, dtype=np.float64) / tokens
    return float(num_experts * np.sum(f * p))


def router_z_loss(logsumexp_squared_sum: float, tokens: float) -> float:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits) ** 2 (logit units squared)."""
    return float(logsumexp_squared_sum / tokens)


def top1_margin(margin_sum: float, tokens: float) -> float:
    """Mean over tokens of p_(1) - p_(2), the gap between the two largest probabilities (0..1)."""
    return float(margin_sum / tokens)


def layer_router_stats(sums: RouterSums, selection_counts: np.ndarray, layer: int) -> dict[str, float]:
    """Every statistic of :data:`ROUTER_STAT_KEYS` for one layer; ``selection_counts [layers, E]``."""
    tokens = sums.tokens[layer]
    num_experts = sums.router_probs.shape[1]
    weight_nats = weight_entropy(sums.weight_entropy[layer], tokens)
    router_nats = router_entropy(sums.router_entropy[layer], tokens)
    return {
        "weight_entropy": weight_nats,
        "router_entropy": router_nats,
        "weight_entropy_norm": normalized_entropy(weight_nats, num_experts),
        "router_entropy_norm": normalized_entropy(router_nats, num_experts),
        "load_balancing_loss": load_balancing_loss(selection_counts[layer], sums.router_probs[layer], tokens),
        "router_z_loss": router_z_loss(sums.logsumexp_squared[layer], tokens),
        "top1_margin": top1_margin(sums.top1_margin[layer], tokens),
    }


def mean_over_layers(per_layer: list[dict[str, Any]]) -> dict[str, float]:
    """The unweighted mean over layers of each statistic (every layer sees the same tokens)."""
    return {key: float(np.mean([entry[key] for entry in per_layer])) for key in ROUTER_STAT_KEYS}


def _k_stats(hist: np.ndarray, min_k: int, max_k: int) -> dict[str, float]:
    ks = np.arange(hist.size)
    total = hist.sum()
    mean = float((hist * ks).sum() / total)
    present = ks[hist > 0]
    cdf = np.cumsum(hist) / total
    return {
        "decisions": int(total),
        "experts_mean": mean,
        "experts_std": float(np.sqrt((hist * (ks - mean) ** 2).sum() / total)),
        "experts_median": float(ks[np.searchsorted(cdf, 0.5)]),
        "experts_min": int(present.min()),
        "experts_max": int(present.max()),
        "ceiling_hit_rate": float(100.0 * hist[max_k] / total),
        "floor_hit_rate": float(100.0 * hist[min_k] / total),
    }


def routing_summary(k_hist: np.ndarray, expert_counts: np.ndarray, min_k: int, max_k: int,
                    p_moments: np.ndarray | None = None, router_sums: RouterSums | None = None) -> dict[str, Any]:
    """Reduce per-layer histograms of k ``[layers, E+1]`` and expert counts ``[layers, E]``.

    With ``router_sums``, each ``per_layer`` entry and the top level (mean over layers) also carry the
    statistics of :data:`ROUTER_STAT_KEYS`, and ``top1_counts`` ``[layers][E]``
    counts tokens by their most probable expert; without, those keys are None.
    """
    overall = _k_stats(k_hist.sum(axis=0), min_k, max_k)
    summary: dict[str, Any] = {"total_decisions": overall.pop("decisions"), **overall,
                               "min_k": min_k, "max_k": max_k}
    if p_moments is not None and p_moments[2] > 0:
        mean = p_moments[0] / p_moments[2]
        summary["pvalue_mean"] = float(mean)
        summary["pvalue_std"] = float(np.sqrt(max(p_moments[1] / p_moments[2] - mean**2, 0.0)))
        summary["selected_pvalue_mean"] = float(p_moments[3] / max(p_moments[4], 1))
    else:
        summary["pvalue_mean"] = summary["pvalue_std"] = summary["selected_pvalue_mean"] = None
    per_layer = [{"layer": i, **_k_stats(h, min_k, max_k)} for i, h in enumerate(k_hist)]
    if router_sums is not None:
        for entry in per_layer:
            entry.update(layer_router_stats(router_sums, expert_counts, entry["layer"]))
        summary.update(mean_over_layers(per_layer))
    else:
        for entry in (summary, *per_layer):
            entry.update(dict.fromkeys(ROUTER_STAT_KEYS))
    summary["per_layer"] = per_layer
    summary["k_histogram"] = {str(k): int(c) for k, c in enumerate(k_hist.sum(axis=0)) if c}
    summary["expert_counts"] = expert_counts.astype(int).tolist()
    summary["top1_counts"] = router_sums.top1_counts.astype(int).tolist() if router_sums is not None else None
    return summary


def summary_from_state(state: dict[str, np.ndarray], min_k: int, max_k: int) -> dict[str, Any]:
    """:func:`routing_summary` of a :meth:`RoutingRecorder.state` (one run's, or merged parts')."""
    num_experts = state["router_probs"].shape[1]
    sums = state["router_sums"]
    router_sums = RouterSums(tokens=sums[:, 0], weight_entropy=sums[:, 1], router_entropy=sums[:, 2],
                             logsumexp_squared=sums[:, 3], top1_margin=sums[:, 4],
                             router_probs=state["router_probs"], top1_counts=state["top1_counts"])
    return routing_summary(state["k_hist"], state["expert_counts"][:, :num_experts], min_k, max_k,
                           state["p_moments"], router_sums)


def merge_states(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The state of consecutive parts of one run (shards), by summing their counts and sums.

    Integer counts merge exactly; the float64 sums equal one run's up to summation order (~1e-15 relative).
    """
    if not states:
        raise ValueError("merge_states: no states to merge")
    return {name: np.sum([state[name] for state in states], axis=0) for name in states[0]}
