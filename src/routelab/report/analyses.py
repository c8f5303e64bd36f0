"""Routing analyses of one run's log, as pure functions on numpy arrays.

A layer's selections are a padded array ``experts [tokens, slots]`` (int, the selected experts most
preferred first, ``-1`` after a token's last one) or, for set operations, bit masks ``[tokens, words]``
(uint64, bit ``e % 64`` of word ``e // 64`` set when expert ``e`` is selected; :func:`selection_masks`).
Reading the log into these arrays is :mod:`routelab.report.routing_analyses`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

WORD_BITS = 64


def selection_masks(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``[tokens, ceil(num_experts / 64)]`` uint64 bit masks of the padded selections ``experts
    [tokens, slots]`` (``-1`` = no expert)."""
    experts = np.asarray(experts)
    assert experts.ndim == 2, experts.shape
    words = max(1, -(-num_experts // WORD_BITS))
    expert = np.arange(num_experts)
    # one row per expert and a last, empty one that index -1 picks: a gather instead of shifts and masks
    bits = np.zeros((num_experts + 1, words), dtype=np.uint64)
    bits[expert, expert // WORD_BITS] = np.left_shift(np.uint64(1), (expert % WORD_BITS).astype(np.uint64))
    if words == 1:
        bits = bits[:, 0]
    if experts.shape[1] == 0:
        return np.zeros((experts.shape[0], words), dtype=np.uint64)
    # slot by slot: half the time of gathering [tokens, slots, words] and reducing over the short slot axis
    masks = bits[experts[:, 0]]
    for slot in range(1, experts.shape[1]):
        masks |= bits[experts[:, slot]]
    return masks[:, None] if words == 1 else masks


def set_sizes(masks: np.ndarray) -> np.ndarray:
    """``[tokens]`` number of experts in each mask of ``masks [tokens, words]``."""
    if masks.shape[1] == 1:  # a reduction over one column costs more than the popcount itself
        return np.bitwise_count(masks[:, 0])
    return np.bitwise_count(masks).sum(axis=1, dtype=np.int64)


def jaccard(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``[tokens]`` |A ∩ B| / |A ∪ B| of two ``[tokens, words]`` masks (1 where both are empty)."""
    inter = set_sizes(first & second)
    union = set_sizes(first | second)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def token_expert_counts(token_index: np.ndarray, experts: np.ndarray, vocab: int, num_experts: int) -> np.ndarray:
    """``[vocab, experts]`` N(x, e): how often each token id (``token_index [tokens]``, its index in
    ``[0, vocab)``) was routed to each expert (``experts [tokens, slots]``, ``-1`` padded)."""
    # token-major cells: a token's experts land in one row of the table, which keeps bincount in cache; a
    # padding slot (-1) counts in an extra last column, dropped, which costs less than filtering them out
    width = num_experts + 1
    cells = np.asarray(token_index, dtype=np.int32)[:, None] * np.int32(width) + np.where(
        experts >= 0, experts, num_experts).astype(np.int32)
    return np.bincount(cells.ravel(), minlength=vocab * width).reshape(vocab, width)[:, :num_experts]


def top_mass(token_counts: np.ndarray, occurrences: np.ndarray, top: int) -> np.ndarray:
    """``[experts]`` sum of each expert's ``top`` largest counts in ``token_counts [vocab, experts]``.
    An id with N(x) below an expert's ``top``-th largest count among the most frequent ids cannot be in
    any top list, so only ids above the smallest such bound are partitioned (few, for Zipf-like text)."""
    vocab = token_counts.shape[0]
    keep = min(top, vocab)
    if keep == 0:
        return np.zeros(token_counts.shape[1], dtype=np.int64)
    frequent = np.argsort(-occurrences, kind="stable")[: max(16 * keep, 256)]
    bound = np.partition(token_counts[frequent], len(frequent) - keep, axis=0)[len(frequent) - keep].min()
    candidates = token_counts[occurrences >= bound] if bound > 0 else token_counts
    return np.partition(candidates, candidates.shape[0] - keep, axis=0)[candidates.shape[0] - keep:].sum(axis=0)


def vocabulary_specialisation(token_counts: np.ndarray, occurrences: np.ndarray, top: int = 10) -> pd.DataFrame:
    """Per expert, how concentrated its tokens are on few token ids (OLMoE paper, Muennighoff et al.
    2024, section "vocabulary specialization").

    ``token_counts [vocab, experts]``: N(x, e), tokens with id x routed to expert e (any of a token's
    selected experts, not only its top-1; :func:`token_expert_counts`); ``occurrences [vocab]``: N(x),
    tokens with id x. The paper defines the specialisation of expert e for token id x as N(x, e) / N(x);
    an expert's ``specialisation`` here is the mean of that ratio over the expert's tokens (each id
    weighted by N(x, e)): sum_x N(x, e)^2 / N(x) / N(e), 1 when the expert gets every occurrence of each
    id it sees. Routing that ignored the token id would give about the expert's ``usage`` (its share of
    the layer's tokens), more for ids seen only a few times. Columns: ``expert, tokens`` (N(e)),
    ``usage``, ``distinct_tokens``, ``top_share`` (share of N(e) in its ``top`` most frequent ids),
    ``specialisation`` (NaN for an expert that got no tokens).
    """
    counts = np.asarray(token_counts)
    occurrences = np.asarray(occurrences)
    assert counts.shape[0] == occurrences.shape[0], (counts.shape, occurrences.shape)
    per_expert = counts.sum(axis=0).astype(np.float64)
    ratio_mass = (counts.T.astype(np.float64) ** 2 @ (1.0 / np.maximum(occurrences, 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        specialisation = np.where(per_expert > 0, ratio_mass / per_expert, np.nan)
        top_share = np.where(per_expert > 0, top_mass(counts, occurrences, top) / per_expert, np.nan)
    return pd.DataFrame({"expert": np.arange(counts.shape[1]), "tokens": per_expert.astype(np.int64),
                         "usage": per_expert / max(float(occurrences.sum()), 1.0),
                         "distinct_tokens": np.count_nonzero(counts, axis=0), "top_share": top_share,
                         "specialisation": specialisation})


def top_tokens(ids: np.ndarray, token_counts: np.ndarray, occurrences: np.ndarray, experts: np.ndarray,
               keep: int = 5) -> pd.DataFrame:
    """The ``keep`` most frequent token ids of each of ``experts`` (columns of ``token_counts [vocab,
    experts]``; ``ids [vocab]``: the token ids of its rows, ``occurrences [vocab]``: N(x)). Columns
    ``expert, rank`` (0 = most frequent), ``token_id, count`` (N(x, e)), ``token_share`` (N(x, e) / N(e)),
    ``token_specialisation`` (N(x, e) / N(x)); ties go to the smaller token id."""
    columns: dict[str, list] = {name: [] for name in
                                ("expert", "rank", "token_id", "count", "token_share", "token_specialisation")}
    for expert in np.asarray(experts, dtype=np.int64):
        row = token_counts[:, expert]
        order = np.lexsort((ids, -row))[:keep]
        order = order[row[order] > 0]
        columns["expert"].append(np.full(order.size, expert))
        columns["rank"].append(np.arange(order.size))
        columns["token_id"].append(ids[order])
        columns["count"].append(row[order])
        columns["token_share"].append(row[order] / max(int(row.sum()), 1))
        columns["token_specialisation"].append(row[order] / occurrences[order])
    return pd.DataFrame({name: np.concatenate(parts) if parts else [] for name, parts in columns.items()})


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def top1_predictability(top1: np.ndarray, next_top1: np.ndarray, num_experts: int) -> dict[str, float]:
    """How well one layer's top-1 expert predicts the next layer's on the same tokens (``top1 [tokens]``,
    ``next_top1 [tokens]``, expert indices).

    ``top1_accuracy``: accuracy of the best predictor that sees only ``top1``, i.e. predicting each
    expert's most frequent successor (fitted on these same tokens); ``top1_majority``: the accuracy of
    always predicting the next layer's most common top-1 (what the first reaches without information);
    ``conditional_entropy_bits``: H(next | top1); ``entropy_bits``: H(next), for scale (they are equal
    when the layers are independent). ``tokens``: the number of token pairs.
    """
    top1, next_top1 = np.asarray(top1, dtype=np.int64), np.asarray(next_top1, dtype=np.int64)
    assert top1.shape == next_top1.shape, (top1.shape, next_top1.shape)
    if top1.size == 0:
        return {"tokens": 0, "top1_accuracy": np.nan, "top1_majority": np.nan,
                "conditional_entropy_bits": np.nan, "entropy_bits": np.nan}
    joint = np.bincount(top1 * num_experts + next_top1, minlength=num_experts ** 2).reshape(num_experts, num_experts)
    tokens = top1.size
    marginal_next = joint.sum(axis=0)
    return {"tokens": tokens, "top1_accuracy": joint.max(axis=1).sum() / tokens,
            "top1_majority": marginal_next.max() / tokens,
            "conditional_entropy_bits": _entropy_bits(joint.ravel()) - _entropy_bits(joint.sum(axis=1)),
            "entropy_bits": _entropy_bits(marginal_next)}


def consecutive_pairs(sequence: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Indices ``i`` of rows whose next row ``i + 1`` is the next position of the same sequence; the
    rows must be sorted by (sequence, position)."""
    sequence, position = np.asarray(sequence), np.asarray(position)
    return np.flatnonzero((sequence[1:] == sequence[:-1]) & (position[1:] == position[:-1] + 1))


def temporal_locality(masks: np.ndarray, pairs: np.ndarray, seed: int = 0) -> dict[str, float]:
    """How often consecutive tokens of a sequence share experts, against chance.

    ``masks [tokens, words]`` (:func:`selection_masks`); ``pairs [pairs]``: rows i whose row i + 1 is the
    next token of the same sequence (:func:`consecutive_pairs`). ``share_any``: share of the pairs with at
    least one expert in common; ``jaccard``: their mean Jaccard. ``chance_*``: the same over pairs of
    tokens drawn independently (each token paired with the token at a random permutation of the rows,
    ``seed``), which keeps each token's own selection and so every expert's usage and the distribution
    of k.
    """
    tokens = masks.shape[0]
    if pairs.size == 0 or tokens < 2:
        return {"pairs": int(pairs.size), "share_any": np.nan, "jaccard": np.nan,
                "chance_share_any": np.nan, "chance_jaccard": np.nan}
    first, second = masks[pairs], masks[pairs + 1]
    shuffled = masks[np.random.default_rng(seed).permutation(tokens)]
    return {"pairs": int(pairs.size), "share_any": float((first & second).any(axis=1).mean()),
            "jaccard": float(jaccard(first, second).mean()),
            "chance_share_any": float((masks & shuffled).any(axis=1).mean()),
            "chance_jaccard": float(jaccard(masks, shuffled).mean())}


def match_tokens(keys: np.ndarray, token_ids: np.ndarray, other_keys: np.ndarray,
                 other_token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(index, other_index)``: rows of ``keys [tokens]`` found in ``other_keys`` (sorted, unique)
    whose ``token_ids`` are also equal (a generated token may differ between runs at the same
    position)."""
    keys, other_keys = np.asarray(keys), np.asarray(other_keys)
    if other_keys.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    where = np.minimum(np.searchsorted(other_keys, keys), other_keys.size - 1)
    found = (other_keys[where] == keys) & (np.asarray(other_token_ids)[where] == np.asarray(token_ids))
    index = np.flatnonzero(found)
    return index, where[index]


def baseline_agreement(masks: np.ndarray, baseline_masks: np.ndarray, baseline_top1: np.ndarray) -> dict[str, float]:
    """Overlap of a run's selections with the baseline's on the same (already matched) tokens:
    ``masks`` and ``baseline_masks [tokens, words]``, ``baseline_top1 [tokens]`` (the baseline's first
    expert). ``jaccard``: mean Jaccard; ``top1_kept``: share of tokens whose baseline top-1 expert the
    run selected; ``matched``: tokens."""
    matched = masks.shape[0]
    if matched == 0:
        return {"matched": 0, "jaccard": np.nan, "top1_kept": np.nan}
    top1 = np.asarray(baseline_top1, dtype=np.uint64)
    words = masks[np.arange(matched), (top1 // np.uint64(WORD_BITS)).astype(np.int64)]
    kept = (words >> (top1 % np.uint64(WORD_BITS))) & np.uint64(1)
    return {"matched": matched, "jaccard": float(jaccard(masks, baseline_masks).mean()),
            "top1_kept": float(kept.mean())}


def log2_edges(largest: int, zero: bool = True) -> np.ndarray:
    """Bin edges ``0, 1, 2, 4, ...`` (without the 0 when not ``zero``), the last one past ``largest``:
    bin i holds ``edges[i] <= value < edges[i + 1]``."""
    powers = 2 ** np.arange(int(largest).bit_length() + 1, dtype=np.int64)
    return np.concatenate([[0], powers]) if zero else powers


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``[tokens]`` the bin of each value (``edges[i] <= value < edges[i + 1]``), -1 below the first edge."""
    return np.searchsorted(edges, np.asarray(values), side="right") - 1


def mean_by_bin(bins: np.ndarray, k: np.ndarray, edges: np.ndarray) -> pd.DataFrame:
    """Mean ``k [tokens]`` of the tokens in each bin of ``edges`` (``bins [tokens]``: :func:`bin_index`);
    columns ``low, high, tokens, k_mean``, empty bins left out."""
    inside = (bins >= 0) & (bins < edges.size - 1)
    if not inside.all():
        bins, k = bins[inside], np.asarray(k)[inside]
    tokens = np.bincount(bins, minlength=edges.size - 1)
    total = np.bincount(bins, weights=k, minlength=edges.size - 1)
    used = np.flatnonzero(tokens)
    return pd.DataFrame({"low": edges[used], "high": edges[used + 1], "tokens": tokens[used],
                         "k_mean": total[used] / tokens[used]})


def coactivation(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``[experts, experts]`` token counts: cell (i, j) = tokens that selected both i and j, the diagonal
    = tokens that selected i (``experts [tokens, slots]``, -1 padded)."""
    valid = experts >= 0
    rows = np.broadcast_to(np.arange(experts.shape[0])[:, None], experts.shape)[valid]
    onehot = sparse.csr_matrix((np.ones(rows.size, dtype=np.int64), (rows, experts[valid].astype(np.int64))),
                               shape=(experts.shape[0], num_experts))
    return (onehot.T @ onehot).toarray()
