"""Counting kernels of the routing rules: how many experts pass, without Python loops over tokens.

Pure tensor functions on ``[tokens, experts]`` inputs, any device. They avoid full sorts where the
rules allow it: BH counts from each p-value's first passing rank (:func:`bh_count_unsorted`), or
from the logits against per-layer logit cuts (:func:`logit_cuts`, :class:`FirstPassingRank`), and
the first ``k`` experts in logit order are one ``topk`` over unique integer keys
(:func:`top_logit_order`). Each has an exact reference (:func:`bh_count` on sorted p-values; a
stable sort) that the tests compare it with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def top_p_count(sorted_probs: torch.Tensor, p: float) -> torch.Tensor:
    """Experts needed to cover probability ``p`` per row: ``min(N, 1 + #{j : c_j < p})``.

    ``sorted_probs`` is ``[tokens, N]`` descending along the last axis; ``c_j`` is its cumulative sum,
    taken in float64 so the boundary is decided by the probabilities themselves rather than by float32
    rounding of the sum (which also differs between CPU and GPU scans). An expert whose cumulative sum
    lands exactly on ``p`` reaches it. ``p = 1`` returns ``N``: every softmax probability is positive,
    so in exact arithmetic the mass is covered only by all experts (float sums may reach 1 earlier).
    Returns ``[tokens]`` int64.
    """
    n = sorted_probs.shape[-1]
    if p >= 1:
        return torch.full(sorted_probs.shape[:-1], n, dtype=torch.long, device=sorted_probs.device)
    cumulative = torch.cumsum(sorted_probs.to(torch.float64), dim=-1)
    return ((cumulative < p).sum(dim=-1) + 1).clamp_(max=n)


def bh_count(sorted_pvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    """Benjamini-Hochberg step-up count per row: ``max{i : p_(i) <= i * alpha / N}`` (0 if none).

    ``sorted_pvalues`` is ``[tokens, N]`` ascending along the last axis; returns ``[tokens]`` int64.
    """
    n = sorted_pvalues.shape[-1]
    ranks = torch.arange(1, n + 1, device=sorted_pvalues.device, dtype=torch.long)
    thresholds = ranks.to(torch.float64) * (alpha / n)
    passing = sorted_pvalues.to(torch.float64) <= thresholds
    return (passing * ranks).amax(dim=-1)


def bh_pvalue_cuts(n: int, alpha: float, device: torch.device | str | None = None) -> torch.Tensor:
    """BH thresholds as float32 cuts: ``c_i`` is the largest float32 not above ``t_i = i * (alpha / n)``,
    so for a float32 ``p`` the float64 test ``p <= t_i`` of :func:`bh_count` is ``p <= c_i``. ``[n]``."""
    thresholds = torch.arange(1, n + 1, device=device, dtype=torch.float64) * (alpha / n)
    cuts = thresholds.float()
    return torch.where(cuts.double() > thresholds, torch.nextafter(cuts, cuts.new_tensor(-math.inf)), cuts)


def count_passing(first_rank: torch.Tensor) -> torch.Tensor:
    """BH step-up count from each value's first passing rank: ``max{i : #{j : rank_j <= i} >= i}`` (0 if none).

    ``first_rank`` ``[tokens, N]`` int64 in ``1..N + 1`` (``N + 1``: passes no threshold); ``p_(i) <= t_i``
    holds exactly when at least ``i`` values pass ``t_i``, and a value passes every threshold from its
    first one on, so a histogram of the ranks and its cumulative sum give every ``#{p_j <= t_i}``.
    Returns ``[tokens]`` int64.
    """
    tokens, n = first_rank.shape
    device = first_rank.device
    histogram = torch.zeros(tokens, n + 2, dtype=torch.int32, device=device)
    ones = torch.ones(1, 1, dtype=torch.int32, device=device).expand(tokens, n)
    histogram.scatter_add_(-1, first_rank, ones)
    passing = histogram[:, 1 : n + 1].cumsum(dim=-1, dtype=torch.int32)  # [tokens, N]: #{p_j <= t_i}, i = 1..N
    ranks = torch.arange(1, n + 1, device=device, dtype=torch.int32)
    return torch.where(passing >= ranks, ranks, 0).amax(dim=-1).long()


def bh_count_unsorted(pvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`bh_count` without sorting: ``pvalues`` ``[tokens, N]`` float32 in any order; ``[tokens]`` int64.

    The count is :func:`count_passing` of each p-value's first passing rank ``min{i : p <= c_i}``
    (:func:`bh_pvalue_cuts`: everything runs in float32 and agrees exactly with the float64 test),
    guessed as ``ceil(p * N / alpha)`` and corrected by one rank against the ``c_i``.
    """
    tokens, n = pvalues.shape
    cuts = bh_pvalue_cuts(n, alpha, pvalues.device)
    # cuts[i] for rank i = 1..N; rank N + 1 (never passes) catches everything, rank 0 nothing.
    cuts = torch.cat([cuts.new_tensor([-math.inf]), cuts, cuts.new_tensor([math.inf])])
    p = pvalues.float()
    rank = torch.ceil(p * (n / alpha)).clamp_(1, n + 1).long().reshape(-1)
    flat = p.reshape(-1)
    rank += flat > cuts.index_select(0, rank)  # the guess's threshold is below p: the next rank is the first
    rank -= (flat <= cuts.index_select(0, rank - 1)).long()  # the rank before already passes (never rank 1)
    return count_passing(rank.view(tokens, n))


def float32_order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the float32 values ``x`` (IEEE-754 floats order like sign-magnitude
    integers: flip the magnitude bits of negative ones); -0.0 and +0.0 get keys -1 and 0."""
    bits = x.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def float32_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float32_order_keys` (the bit flip is its own inverse)."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def logit_cuts(pvalue_of: Callable[[torch.Tensor], torch.Tensor], pvalue_cuts: torch.Tensor) -> torch.Tensor:
    """For each p-value cut ``c``, the smallest float32 ``x`` with ``pvalue_of(x) <= c``.

    ``pvalue_of`` maps float32 ``[m]`` to p-values ``[m]`` and must never increase with ``x`` (exactly, in
    floats); then ``pvalue_of(x) <= c`` holds exactly when ``x >= cut``. A cut no finite ``x`` reaches is
    ``+inf``; one every finite ``x`` passes is ``-inf``. Bisection on :func:`float32_order_keys` (34
    halvings of the 2**32 keys, all cuts at once, on ``pvalue_cuts``' device, without host syncs), so the
    p-values compared are those the device computes. Returns float32 ``[m]``.
    """
    largest = torch.full_like(pvalue_cuts, torch.finfo(torch.float32).max, dtype=torch.float32)
    every = pvalue_of(-largest) <= pvalue_cuts  # even the smallest finite x passes
    none = pvalue_of(largest) > pvalue_cuts  # even the largest finite x fails
    low, high = float32_order_keys(-largest).long(), float32_order_keys(largest).long()  # low fails, high passes
    for _ in range(34):
        mid = torch.div(low + high, 2, rounding_mode="floor")
        passes = pvalue_of(float32_from_keys(mid)) <= pvalue_cuts
        high, low = torch.where(passes, mid, high), torch.where(passes, low, mid)
    cuts = float32_from_keys(high)
    return torch.where(every, -math.inf, torch.where(none, math.inf, cuts))


class FirstPassingRank:
    """``r(x) = min{i : x >= cuts[i - 1]}`` (``n + 1`` if none) for a non-increasing float32 ``cuts`` ``[n]``,
    exactly, by table lookup instead of a binary search: built once per (layer, router), then called
    on logits ``[tokens, experts]`` every forward.

    The range of the finite cuts is split into uniform cells narrow enough that a cell, widened by a
    margin far above float32 rounding of the cell arithmetic, holds at most one distinct cut; each cell
    stores that cut and the ranks above and below it (or one rank and a cut of -inf). A call is the
    cell arithmetic, three ``index_select`` lookups and one comparison. ``usable`` is False when the
    cuts are so close together that the table would need more than :attr:`MAX_CELLS` cells (callers
    then use p-values).
    """

    MAX_CELLS = 1 << 15
    MARGIN = 0.01  # cells; the float32 cell arithmetic errs by at most ~MAX_CELLS * 2**-23 < 0.004

    def __init__(self, cuts: torch.Tensor):
        device = cuts.device
        host = cuts.detach().double().cpu().numpy()
        distinct = np.unique(host[np.isfinite(host)])[::-1]  # descending
        # first rank of each distinct cut, and the rank of x below every finite cut (-inf cuts pass anyway)
        ascending = -host  # non-decreasing
        first = (np.searchsorted(ascending, -distinct, side="left") + 1).astype(np.int64)
        below_all = int(np.searchsorted(ascending, math.inf, side="left") + 1)  # first -inf cut, else n + 1
        self.usable, self.constant = True, None
        if distinct.size == 0:
            self.constant = below_all
            return
        high, low = float(distinct[0]), float(distinct[-1])
        cells, scale = 1, 0.0
        if distinct.size > 1:
            gap = float(np.min(distinct[:-1] - distinct[1:]))
            cells = int(math.ceil(1.25 * (high - low) / gap)) + 1
            if cells > self.MAX_CELLS:
                self.usable = False
                return
            scale = float(np.float32(cells / (high - low)))
        # position of each distinct cut in cell units, as the float32 arithmetic would place it
        where = (distinct - low) * scale
        split = np.full(cells, -math.inf)
        above = np.empty(cells, dtype=np.int64)
        below = np.empty(cells, dtype=np.int64)
        # cells without a cut: the rank at the cell's middle
        middle = low + (np.arange(cells) + 0.5) / scale if scale else np.full(cells, low + 1.0)
        ranks_after = np.append(first, below_all)  # rank of x below distinct cut j and above cut j + 1
        above[:] = below[:] = ranks_after[np.searchsorted(-distinct, -middle, side="left")]  # #{cuts > middle}
        for j, u in enumerate(where):
            for cell in range(max(0, math.ceil(u - 1 - self.MARGIN)), min(cells - 1, math.floor(u + self.MARGIN)) + 1):
                split[cell], above[cell], below[cell] = distinct[j], first[j], ranks_after[j + 1]
        self.low = float(np.float32(low))
        self.scale, self.last = scale, cells - 1
        self.split = torch.as_tensor(split, dtype=torch.float32, device=device)
        self.above = torch.as_tensor(above, device=device)
        self.below = torch.as_tensor(below, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """First passing ranks of float32-exact ``x`` (any shape, compared as float32); int64, same shape."""
        x = x.float()
        if self.constant is not None:
            return torch.full(x.shape, self.constant, dtype=torch.long, device=x.device)
        cell = (x - self.low).mul_(self.scale).clamp_(0, self.last).to(torch.int32).reshape(-1)
        flat = x.reshape(-1)
        rank = torch.where(flat >= self.split.index_select(0, cell), self.above.index_select(0, cell),
                           self.below.index_select(0, cell))
        return rank.view(x.shape)


def hc_search_size(n: int, alpha0: float) -> int:
    """Ranks higher criticism searches: ``max(1, floor(alpha0 * n))`` (``0.57 * 100`` counts as 57)."""
    return max(1, math.floor(round(alpha0 * n, 9)))


def hc_count(sorted_pvalues: torch.Tensor, alpha0: float = 0.5) -> torch.Tensor:
    """Higher-criticism count per row (Donoho & Jin 2004): the rank ``i`` that maximises

    ``HC_i = sqrt(N) * (i/N - p_(i)) / sqrt(p_(i) * (1 - p_(i)))`` over ``i = 1..hc_search_size(N, alpha0)``,

    in float64, with ``HC_i = +inf`` where ``p_(i) = 0`` and ``-inf`` where ``p_(i) = 1`` (no evidence;
    ``0/0`` at ``i = N``). Ties in the maximum go to the largest ``i`` (so a block of equal p-values is
    kept together); a row whose searched p-values are all 1 gets 0. ``sorted_pvalues`` is
    ``[tokens, N]`` ascending along the last axis; returns ``[tokens]`` int64.
    """
    n = sorted_pvalues.shape[-1]
    m = hc_search_size(n, alpha0)
    p = sorted_pvalues[..., :m].to(torch.float64)
    ranks = torch.arange(1, m + 1, device=p.device, dtype=torch.float64)
    hc = math.sqrt(n) * (ranks / n - p) / torch.sqrt(p * (1 - p))
    hc = torch.where(p <= 0, math.inf, torch.where(p >= 1, -math.inf, hc))
    best = m - torch.argmax(hc.flip(-1), dim=-1)  # argmax returns the first maximum: flip for the last
    return torch.where(hc.amax(dim=-1) == -math.inf, 0, best)


def order_by_pvalue(pvalues: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Expert order by ascending p-value, ties broken by descending logit. ``[tokens, experts]``."""
    by_logit = torch.argsort(logits, dim=-1, descending=True, stable=True)
    by_p = torch.argsort(pvalues.gather(-1, by_logit), dim=-1, stable=True)
    return by_logit.gather(-1, by_p)


_KEYED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # exactly representable in float32


def descending_logit_keys(logits: torch.Tensor) -> torch.Tensor:
    """int64 keys ``[tokens, experts]`` that order like (logit descending, expert index ascending) and never tie.

    IEEE-754 floats order like sign-magnitude integers: flipping the magnitude bits of negative ones
    gives int32s that order like the floats (-0.0 is first made +0.0, as the two compare equal). The
    low bits hold ``experts - 1 - index``, so equal logits rank the lower expert index first. Logits
    must be float32, bfloat16 or float16 (exact in float32).
    """
    experts = logits.shape[-1]
    shift = max(1, (experts - 1).bit_length())
    ordered = float32_order_keys(logits.float() + 0.0)
    tiebreak = torch.arange(experts - 1, -1, -1, device=logits.device)
    return torch.add(tiebreak, ordered, alpha=1 << shift)  # int64: ordered * 2**shift + tiebreak, one pass


def top_logit_order(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` experts with the largest logits per token, largest first, ties to the lower expert index.

    Equal to ``torch.sort(logits, descending=True, stable=True).indices[:, :k]``, but one ``topk`` over
    :func:`descending_logit_keys` (unique keys: any ``topk`` implementation gives the stable order),
    which costs about what the native router's ``topk`` does instead of a full sort. ``[tokens, k]`` int64.
    """
    if logits.dtype not in _KEYED_DTYPES:
        return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k].contiguous()
    return torch.topk(descending_logit_keys(logits), k, dim=-1).indices
