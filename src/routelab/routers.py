"""Routing rules: router logits ``[tokens, experts]`` -> a padded, variable-k expert selection.

Every router returns a :class:`Selection`: ``indices`` and ``weights`` of shape ``[tokens, max_k]``
whose first ``k[t]`` slots hold token ``t``'s experts (most preferred first) and whose unused slots
hold the sentinel index ``num_experts`` with weight 0. Pure tensor code: no Python loop over tokens,
any device, any floating dtype.

Weights are the model's softmax probabilities of the selected experts. The ``weights`` policy says
what happens next: ``model`` renormalises them over the selected experts exactly when the model's
``norm_topk_prob`` says so (OLMoE-1B-7B: no), ``renormalize`` always does, ``none`` never does.

Logits must be finite: a call whose logits contain NaN or +-inf raises ``ValueError`` naming the
layer and how many tokens are affected, instead of routing those tokens on garbage.

Cost: routers run once per MoE layer per forward, so the common paths avoid full sorts. The order of
the first ``max_k`` experts is one ``topk`` over unique integer keys (:func:`top_logit_order`), BH
counts without sorting (:func:`bh_count_unsorted`), a p-value router with ``min_k == max_k`` and a
null monotone in the logit selects the top k by logit without computing p-values at all, and BH with
a per-layer tabulated null (kde, empirical) counts on the logits against cuts found once per layer
(:meth:`BHRouter.count_from_logits`), exactly as on the p-values. Either way the p-values are
computed only if a recorder reads :attr:`Selection.pvalues`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

WEIGHT_POLICIES = ("model", "renormalize", "none")


class RouterConfigError(ValueError):
    """Router parameters that cannot work for this model."""


class PValueNull(Protocol):
    """What a p-value router needs of a null (every kind in :mod:`routelab.nulls` has it)."""

    num_experts: int | None  # None: fits any expert count

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        """``[tokens, experts]`` float32 p-values in (0, 1] on the logits' device."""


PValues = torch.Tensor | Callable[[torch.Tensor | None], torch.Tensor] | None


class Selection:
    """One layer's routing decisions for a batch of tokens.

    ``indices`` ``[tokens, max_k]`` int64 (sentinel ``num_experts`` in unused slots), ``weights``
    ``[tokens, max_k]`` (0 in unused slots), ``k`` ``[tokens]`` int64 (experts selected per token) and,
    for p-value routers, ``pvalues`` ``[tokens, experts]`` float32. ``pvalues`` may be given as a
    function of the token rows (a 1-D index tensor, or None for all) that computes them: a router that
    selected without them then pays for them only if a recorder reads them, and only for the rows it
    reads (:meth:`pvalues_at`).

    For recorders, optionally: ``probs`` ``[tokens, experts]`` float32, the expert probabilities the
    weights were taken from; and, from a router whose preference order is descending probability,
    ``top_expert`` ``[tokens]`` (the most probable expert) and ``top_probs`` ``[tokens, 2]`` (the two
    largest probabilities, whatever k is), so statistics need no index reduction over all experts.
    """

    __slots__ = ("indices", "weights", "k", "_pvalues", "probs", "top_expert", "top_probs", "_rows_asked")

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, pvalues: PValues = None,
                 probs: torch.Tensor | None = None, top_expert: torch.Tensor | None = None,
                 top_probs: torch.Tensor | None = None):
        self.indices, self.weights, self.k, self._pvalues, self.probs = indices, weights, k, pvalues, probs
        self.top_expert, self.top_probs = top_expert, top_probs
        self._rows_asked: tuple[torch.Tensor, torch.Tensor] | None = None  # the last pvalues_at(rows) and its answer

    @property
    def pvalues(self) -> torch.Tensor | None:
        """All tokens' p-values ``[tokens, experts]`` (computed on first read), None without p-values."""
        if callable(self._pvalues):
            self._pvalues = self._pvalues(None)
        return self._pvalues

    def pvalues_at(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The p-values of the token rows ``rows`` (1-D int64 on the selection's device), ``[len(rows),
        experts]``; computes only those rows unless all were computed already, and answers a second call
        with the same ``rows`` tensor (the same object: several recorders sampling alike) from the first.
        None without p-values."""
        if callable(self._pvalues):
            if self._rows_asked is None or self._rows_asked[0] is not rows:
                self._rows_asked = (rows, self._pvalues(rows))
            return self._rows_asked[1]
        return None if self._pvalues is None else self._pvalues.index_select(0, rows)

    def __repr__(self) -> str:
        return f"Selection(tokens={self.k.shape[0]}, max_k={self.indices.shape[-1]})"


class LayerPValues:
    """One layer's p-values, computed when read: a p-value router's lazy :attr:`Selection.pvalues`.
    Called with ``rows`` (1-D int64), the p-values of those token rows only; with None, of all tokens.
    :func:`pvalues_at_layers` computes several layers' at once when their null can."""

    __slots__ = ("null", "logits", "layer", "temperature")

    def __init__(self, null: PValueNull, logits: torch.Tensor, layer: int, temperature: float):
        self.null, self.logits, self.layer, self.temperature = null, logits, layer, temperature

    def __call__(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits if rows is None else self.logits.index_select(0, rows)
        return self.null.pvalues(logits, self.layer, self.temperature)


def pvalues_at_layers(selections: Sequence[Selection], rows: torch.Tensor) -> torch.Tensor | None:
    """``[len(selections), len(rows), experts]``: :meth:`Selection.pvalues_at` of each selection (one per
    layer of a forward pass), None if any has no p-values.

    The layers whose p-values are still to compute, against one null with a ``pvalues_layers`` method
    (the per-layer tabulated nulls), are computed in one call instead of one per layer, and kept in
    each selection as :meth:`~Selection.pvalues_at` keeps its answers: a second recorder asking with
    the same ``rows`` tensor computes nothing.
    """
    pending = [s for s in selections if isinstance(s._pvalues, LayerPValues)
               and (s._rows_asked is None or s._rows_asked[0] is not rows)]
    first = pending[0]._pvalues if pending else None
    if (len(pending) > 1 and hasattr(first.null, "pvalues_layers")
            and all(s._pvalues.null is first.null and s._pvalues.temperature == first.temperature
                    and s._pvalues.logits.dtype == first.logits.dtype
                    and s._pvalues.logits.device == first.logits.device for s in pending)):
        logits = torch.stack([s._pvalues.logits.index_select(0, rows) for s in pending])
        computed = first.null.pvalues_layers(logits, [s._pvalues.layer for s in pending], first.temperature)
        for selection, pvalues in zip(pending, computed):
            selection._rows_asked = (rows, pvalues)
        if len(pending) == len(selections):
            return computed
    answers = [s.pvalues_at(rows) for s in selections]
    return None if any(p is None for p in answers) else torch.stack(answers)


def check_fraction(key: str, value: Any) -> float:
    """``value`` as a float in ``(0, 1]`` or a :class:`RouterConfigError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise RouterConfigError(f"{key}: {value!r} is out of range; valid: 0 < {key} <= 1")
    return float(value)


def nonfinite_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Number of tokens (rows of ``logits`` ``[tokens, experts]``) with a NaN or infinite logit; 0-d int64."""
    return (~torch.isfinite(logits)).any(dim=-1).sum()


def raise_nonfinite(layer: int, bad: int, tokens: int) -> None:
    """The error for ``bad`` of ``tokens`` tokens with NaN or infinite router logits in ``layer``."""
    raise ValueError(
        f"logits of layer {layer}: {bad} of {tokens} tokens have NaN or infinite router logits; "
        "routers need finite logits (look for overflow in the model's dtype or a broken checkpoint)"
    )


def check_finite_logits(logits: torch.Tensor, layer: int) -> None:
    """Raise ``ValueError`` if any logit is NaN or infinite.

    A NaN or infinity anywhere makes the sum non-finite, so one cheap reduction clears the usual case;
    only a non-finite sum (or finite logits so large that their sum overflows) counts the bad tokens.
    """
    if bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        return
    bad = int(nonfinite_tokens(logits))
    if bad:
        raise_nonfinite(layer, bad, logits.shape[0])


def softmax_float32(logits: torch.Tensor) -> torch.Tensor:
    """Expert probabilities ``[tokens, experts]``: softmax over experts in float32, as native routers."""
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


class Router:
    """Base class: subclasses implement :meth:`rank` (preference order and k per token)."""

    method: ClassVar[str]
    needs_null: ClassVar[bool] = False

    def __init__(self, num_experts: int, max_k: int, min_k: int = 1, weights: str = "model"):
        if weights not in WEIGHT_POLICIES:
            raise RouterConfigError(f"weights: {weights!r} is not valid; choose one of {', '.join(WEIGHT_POLICIES)}")
        for key, value in (("min_k", min_k), ("max_k", max_k)):
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise RouterConfigError(f"{key}: {value!r} is not valid; need an integer in 1..{num_experts}")
        if not 1 <= min_k:
            raise RouterConfigError(f"min_k: {min_k} is not valid; need min_k >= 1")
        if min_k > max_k:
            raise RouterConfigError(f"min_k: {min_k} is greater than max_k = {max_k}; need min_k <= max_k")
        if max_k > num_experts:
            raise RouterConfigError(f"max_k: {max_k} exceeds the model's {num_experts} experts; need max_k <= {num_experts}")
        self.num_experts, self.max_k, self.min_k, self.weight_policy = num_experts, int(max_k), int(min_k), weights

    def rank(self, logits: torch.Tensor, layer: int,
             probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, PValues]:
        """Return ``(order [tokens, max_k], k [tokens], pvalues)``; ``order`` most preferred first.

        ``probs`` are the expert probabilities :meth:`__call__` already computed (None: compute them).
        ``pvalues`` is None for routers without p-values, else a ``[tokens, experts]`` tensor or a function
        returning it (see :class:`Selection`).
        """
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, layer: int = 0, norm_topk_prob: bool = False,
                 probs: torch.Tensor | None = None, check_finite: bool = True) -> Selection:
        """Select experts for ``logits`` ``[tokens, experts]`` of MoE layer ``layer``.

        ``probs`` ``[tokens, experts]`` are the probabilities the weights are taken from; default the
        softmax of the logits in float32 (model families that score experts otherwise pass their own).
        Raises ``ValueError`` if any logit is NaN or infinite, unless ``check_finite`` is False (the
        caller checks them itself, as :func:`routelab.patching.install_router` does on accelerators
        once per forward instead of once per layer).
        """
        if logits.dim() != 2 or logits.shape[-1] != self.num_experts:
            raise ValueError(f"logits: expected shape [tokens, {self.num_experts}], got {tuple(logits.shape)}")
        if check_finite:
            check_finite_logits(logits, layer)
        if probs is None:
            probs = softmax_float32(logits)
        order, k, pvalues = self.rank(logits, layer, probs)
        weights = probs.gather(-1, order)
        top = {}
        if self.max_k >= 2 and self.orders_by_probability():  # the first two slots are the two most probable
            top = {"top_expert": order[:, 0], "top_probs": weights[:, :2]}
        if self.min_k == self.max_k:  # every slot used: no sentinel to write
            indices = order
        else:
            used = torch.arange(self.max_k, device=logits.device) < k.unsqueeze(-1)
            weights = weights * used
            indices = order.masked_fill(~used, self.num_experts)
        if self.weight_policy == "renormalize" or (self.weight_policy == "model" and norm_topk_prob):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Selection(indices=indices, weights=weights, k=k, pvalues=pvalues, probs=probs, **top)

    def orders_by_probability(self) -> bool:
        """Whether :meth:`rank` orders experts by descending probability (ties aside): then the first
        two slots of the order are the two most probable experts. Routers that order otherwise say no."""
        return True

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "min_k": self.min_k, "max_k": self.max_k, "weights": self.weight_policy}


class TopKRouter(Router):
    """The standard rule: the ``k`` experts with the largest router probabilities."""

    method = "topk"

    def __init__(self, num_experts: int, k: int, weights: str = "model"):
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= num_experts:
            raise RouterConfigError(f"k: {k!r} is out of range; valid: 1 <= k <= {num_experts} (the model's experts)")
        super().__init__(num_experts, max_k=k, min_k=k, weights=weights)
        self.k = int(k)

    def rank(self, logits, layer, probs=None):
        # Same ops as the native routers (softmax in float32, then topk) so ties break identically.
        probs = softmax_float32(logits) if probs is None else probs
        order = torch.topk(probs, self.k, dim=-1).indices
        k = torch.full(logits.shape[:1], self.k, dtype=torch.long, device=logits.device)
        return order, k, None


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


class TopPRouter(Router):
    """Top-p (Huang et al. 2024, "Harder Tasks Need More Experts"): the most probable experts until
    their cumulative probability reaches ``p``, the crossing expert included, clamped to [min_k, max_k].

    Probabilities are the softmax of the logits in float32, ordered descending (ties: lower expert
    index first); ``k`` is :func:`top_p_count`. ``p = 1`` selects ``max_k`` experts for every token.
    """

    method = "topp"

    def __init__(self, num_experts: int, p: float, min_k: int, max_k: int, weights: str = "model"):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        self.p = check_fraction("p", p)

    def rank(self, logits, layer, probs=None):
        probs = softmax_float32(logits) if probs is None else probs
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        k = top_p_count(sorted_probs, self.p).clamp_(self.min_k, self.max_k)
        return order[:, : self.max_k].contiguous(), k, None

    def describe(self):
        return {**super().describe(), "p": self.p}


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


class PValueRouter(Router):
    """Base of routers that count significant experts in p-values ``p = sf_null(logit / temperature)``.

    Subclasses implement :meth:`count` on p-values sorted ascending; the count is clamped to
    [min_k, max_k] and the experts with the smallest p-values (ties: larger logit first) are taken.
    """

    needs_null = True

    def __init__(self, num_experts: int, null: PValueNull, min_k: int, max_k: int,
                 temperature: float = 1.0, weights: str = "model"):
        super().__init__(num_experts, max_k=max_k, min_k=min_k, weights=weights)
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or not temperature > 0:
            raise RouterConfigError(f"temperature: {temperature!r} is out of range; valid: temperature > 0")
        if null.num_experts is not None and null.num_experts != num_experts:
            raise RouterConfigError(
                f"null: fitted for {null.num_experts} experts but the model has {num_experts}; rerun calibrate_null"
            )
        self.null, self.temperature = null, float(temperature)

    def count(self, sorted_pvalues: torch.Tensor) -> torch.Tensor:
        """Experts selected per token before clamping, ``[tokens]`` int64."""
        raise NotImplementedError

    def orders_by_probability(self) -> bool:
        # Ascending p is descending logit order (softmax probability) only for a null monotone in the logit.
        return bool(getattr(self.null, "monotone_in_logit", False))

    def count_unsorted(self, pvalues: torch.Tensor) -> torch.Tensor:
        """:meth:`count` of ``pvalues`` ``[tokens, experts]`` in any order (subclasses may avoid the sort)."""
        return self.count(torch.sort(pvalues, dim=-1).values)

    def rank(self, logits, layer, probs=None):
        pvalues = LayerPValues(self.null, logits, layer, self.temperature)
        if not getattr(self.null, "monotone_in_logit", False):
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
            return order, torch.full(logits.shape[:1], self.max_k, dtype=torch.long, device=logits.device), pvalues
        count = self.count_from_logits(logits, layer)
        if count is not None:  # counted without p-values: they are computed only if someone reads them
            return order, count.clamp_(self.min_k, self.max_k), pvalues
        computed = pvalues()
        return order, self.count_unsorted(computed).clamp_(self.min_k, self.max_k), computed

    def count_from_logits(self, logits: torch.Tensor, layer: int) -> torch.Tensor | None:
        """The count of :meth:`count_unsorted` decided on the logits themselves, or None where a subclass
        or null cannot (then the p-values are computed and counted)."""
        return None

    def describe(self):
        return {**super().describe(), "temperature": self.temperature}


class BHRouter(PValueRouter):
    """Adaptive k: BH step-up at level ``alpha`` on p-values against a per-layer null, clamped.

    ``p = sf_null(logit / temperature)``. If fewer than ``min_k`` experts pass, the ``min_k`` with the
    smallest p-values are taken; if more than ``max_k`` pass, the ``max_k`` smallest.
    """

    method = "bh"

    def __init__(self, num_experts: int, null: PValueNull, alpha: float, min_k: int, max_k: int,
                 temperature: float = 1.0, weights: str = "model"):
        super().__init__(num_experts, null, min_k=min_k, max_k=max_k, temperature=temperature, weights=weights)
        self.alpha = check_fraction("alpha", alpha)
        self._first_rank: dict[tuple[str, int], FirstPassingRank] = {}

    def count(self, sorted_pvalues):
        return bh_count(sorted_pvalues, self.alpha)

    def count_unsorted(self, pvalues):
        return bh_count_unsorted(pvalues, self.alpha)

    def count_from_logits(self, logits, layer):
        """BH in logit space, for a null whose p-value is one non-increasing function of the logit per
        layer (``pointwise_in_logit``; kde and empirical): ``p <= c_i`` is ``logit >= x_i``, with the cuts
        ``x_i`` found once per layer and device by :func:`logit_cuts` on the null's own p-values, so the
        count equals :func:`bh_count_unsorted` of the p-values exactly while computing none of them."""
        if not getattr(self.null, "pointwise_in_logit", False):
            return None
        key = (str(logits.device), layer)
        if key not in self._first_rank:
            def pvalue_of(x: torch.Tensor) -> torch.Tensor:
                return self.null.pvalues(x.view(1, -1), layer, self.temperature).view(-1)

            cuts = logit_cuts(pvalue_of, bh_pvalue_cuts(self.num_experts, self.alpha, logits.device))
            self._first_rank[key] = FirstPassingRank(cuts)
        first_rank = self._first_rank[key]
        return count_passing(first_rank(logits)) if first_rank.usable else None

    def describe(self):
        return {**super().describe(), "alpha": self.alpha}


class HCRouter(PValueRouter):
    """Adaptive k by higher criticism (Donoho & Jin 2004) on the same p-values as :class:`BHRouter`.

    ``k`` is the HC-maximising rank among the ``alpha0`` fraction of smallest p-values
    (:func:`hc_count`; the threshold is ``p_(k)``), clamped to [min_k, max_k]. Unlike BH there is no
    level: HC picks where the excess of small p-values over the uniform is most significant.
    """

    method = "hc"

    def __init__(self, num_experts: int, null: PValueNull, min_k: int, max_k: int,
                 temperature: float = 1.0, weights: str = "model", alpha0: float = 0.5):
        super().__init__(num_experts, null, min_k=min_k, max_k=max_k, temperature=temperature, weights=weights)
        self.alpha0 = check_fraction("alpha0", alpha0)

    def count(self, sorted_pvalues):
        return hc_count(sorted_pvalues, self.alpha0)

    def describe(self):
        return {**super().describe(), "alpha0": self.alpha0}


ROUTERS: dict[str, type[Router]] = {cls.method: cls for cls in (TopKRouter, BHRouter, TopPRouter, HCRouter)}


def _or_model_top_k(value: int | None, model_top_k: int) -> int:
    return model_top_k if value is None else value


def _required(spec: dict, key: str) -> Any:
    if key not in spec:
        raise RouterConfigError(f"{key}: missing; method {spec['method']!r} needs it")
    return spec[key]


def build_router(spec: dict, num_experts: int, model_top_k: int, null: PValueNull | None = None) -> Router:
    """Instantiate the router a (normalised) routing config describes for a model.

    ``k`` / ``max_k`` left at ``None`` mean the model's own top-k, for every method (so an adaptive
    router never uses more experts per token than the model was trained with unless asked to).
    """
    method = spec["method"]
    if method not in ROUTERS:
        raise RouterConfigError(f"method: {method!r} is not a router; choose one of {', '.join(ROUTERS)}")
    weights = spec.get("weights", "model")
    if method == "topk":
        return TopKRouter(num_experts, k=_or_model_top_k(spec.get("k"), model_top_k), weights=weights)
    min_k, max_k = spec.get("min_k", 1), _or_model_top_k(spec.get("max_k"), model_top_k)
    if method == "topp":
        return TopPRouter(num_experts, p=_required(spec, "p"), min_k=min_k, max_k=max_k, weights=weights)
    if null is None:
        raise RouterConfigError(f"method {method!r} needs a calibrated null; run calibrate_null first")
    temperature = spec.get("temperature", 1.0)
    if method == "hc":
        return HCRouter(num_experts, null, min_k=min_k, max_k=max_k, temperature=temperature, weights=weights,
                        alpha0=spec.get("alpha0", 0.5))
    return BHRouter(num_experts, null, alpha=_required(spec, "alpha"), min_k=min_k, max_k=max_k,
                    temperature=temperature, weights=weights)
