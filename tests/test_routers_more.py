"""Top-p and higher-criticism routers, bad input for every router, and invariants all routers share.

References are written independently here: numpy top-p and HC with explicit loops, hand-worked
examples with the arithmetic in comments, and nulls whose p-values are known exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import false_discovery_control, norm

from routelab.nulls import TabulatedNull
from routelab.routers import (ROUTERS, BHRouter, HCRouter, RouterConfigError, TopKRouter, TopPRouter, bh_count,
                              bh_count_unsorted, build_router, hc_count, top_logit_order, top_p_count)

GRID = np.linspace(-10.0, 10.0, 2001).astype(np.float32)
NORMAL_SF = norm.sf(GRID.astype(np.float64)).astype(np.float32)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def normal_null(num_experts: int, layers: int = 1) -> TabulatedNull:
    """p = norm.sf(logit), exact for logits on GRID."""
    return TabulatedNull(grid=np.tile(GRID, (layers, 1)), sf=np.tile(NORMAL_SF, (layers, 1)),
                         num_experts=num_experts, min_pvalue=1e-30)


def make_router(method: str, num_experts: int, min_k: int, max_k: int, weights: str = "model", **extra):
    """One router of each method with the given clamp; TopK uses k = max_k (its min_k is k)."""
    if method == "topk":
        return TopKRouter(num_experts, k=max_k, weights=weights)
    if method == "topp":
        return TopPRouter(num_experts, p=extra.get("p", 0.6), min_k=min_k, max_k=max_k, weights=weights)
    null = normal_null(num_experts, layers=6)
    if method == "bh":
        return BHRouter(num_experts, null, alpha=extra.get("alpha", 0.1), min_k=min_k, max_k=max_k, weights=weights)
    return HCRouter(num_experts, null, min_k=min_k, max_k=max_k, weights=weights, alpha0=extra.get("alpha0", 0.5))


def check_selection(sel, num_experts: int, min_k: int, max_k: int) -> None:
    """The Selection contract: shapes, clamp, sentinel and zero weight in unused slots, unique experts."""
    tokens = sel.k.shape[0]
    assert sel.indices.shape == sel.weights.shape == (tokens, max_k)
    assert sel.indices.dtype == sel.k.dtype == torch.long and sel.weights.dtype == torch.float32
    assert ((sel.k >= min_k) & (sel.k <= max_k)).all()
    used = torch.arange(max_k) < sel.k.unsqueeze(-1)
    assert (sel.indices[~used] == num_experts).all() and (sel.weights[~used] == 0).all()
    assert ((sel.indices[used] >= 0) & (sel.indices[used] < num_experts)).all()
    assert (sel.weights >= 0).all() and torch.isfinite(sel.weights).all()
    one_hot = torch.zeros(tokens, num_experts + 1, dtype=torch.long).scatter_add_(
        -1, sel.indices, torch.ones_like(sel.indices))
    assert (one_hot[:, :num_experts] <= 1).all(), "an expert appears twice in one token's selection"


# --- top-p: the count --------------------------------------------------------------------------------

# Dyadic probabilities: every cumulative sum is exact, so the boundary cases are decided exactly.
# cumulative sums of [1/2, 1/4, 1/8, 1/8] are [0.5, 0.75, 0.875, 1.0].
TOP_P_CASES = {
    "tiny p takes the first expert": (0.01, 1),
    "p reached exactly by the first": (0.5, 1),  # 0.5 >= 0.5 at expert 1
    "just above the first": (0.5 + 1e-12, 2),  # 0.5 < p, 0.75 >= p
    "p reached exactly by the second": (0.75, 2),  # the crossing expert is the one landing on p
    "just above the second": (0.75 + 1e-12, 3),
    "p = 0.875 exactly": (0.875, 3),
    "just below one": (1 - 1e-12, 4),
    "p = 1 takes every expert": (1.0, 4),
}


@pytest.mark.parametrize("case", list(TOP_P_CASES), ids=list(TOP_P_CASES))
def test_top_p_count_matches_hand_worked_boundaries(case):
    p, hand_k = TOP_P_CASES[case]
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    assert top_p_count(probs, p).tolist() == [hand_k]


def test_top_p_count_p_one_covers_experts_whose_probability_underflowed():
    # float32 cumulative sum is already 1.0 after the first expert; p = 1 still means all of them.
    probs = torch.softmax(torch.tensor([[0.0, -200.0, -300.0, -400.0]]), dim=-1)
    assert probs[0, 1:].eq(0).all()
    assert top_p_count(probs, 1.0).tolist() == [4]
    assert top_p_count(probs, 0.999).tolist() == [1]


def test_top_p_count_never_exceeds_the_expert_count_when_the_sum_falls_short_of_p():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625]])  # sums to 0.9375
    assert top_p_count(probs, 0.99).tolist() == [4]


# --- top-p: the router ---------------------------------------------------------------------------------


def reference_top_p(probs32: np.ndarray, p: float, min_k: int, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy top-p: ``(order [tokens, experts], k [tokens])`` from float32 probabilities."""
    probs = probs32.astype(np.float64)
    order = np.argsort(-probs, axis=-1, kind="stable")
    ks = []
    for row, row_order in zip(probs, order):
        cumulative = np.cumsum(row[row_order])
        # searchsorted(left) = how many cumulative sums lie strictly below p.
        k = row.size if p == 1 else min(row.size, int(np.searchsorted(cumulative, p, side="left")) + 1)
        ks.append(min(max(k, min_k), max_k))
    return order, np.asarray(ks)


@pytest.mark.parametrize("p,min_k,max_k", [(0.5, 1, 8), (0.9, 1, 16), (0.3, 2, 4), (1.0, 1, 6), (0.7, 3, 3)])
def test_top_p_router_matches_numpy_reference(p, min_k, max_k):
    num_experts = 16
    rng = np.random.default_rng(11)
    # Per-token temperature spreads the entropy, so both sharp and flat tokens occur.
    logits = rng.normal(size=(400, num_experts)) * rng.uniform(0.2, 4.0, size=(400, 1))
    logits = torch.from_numpy(logits.astype(np.float32))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).numpy()

    sel = TopPRouter(num_experts, p=p, min_k=min_k, max_k=max_k, weights="none")(logits)

    check_selection(sel, num_experts, min_k, max_k)
    order, expected_k = reference_top_p(probs, p, min_k, max_k)
    np.testing.assert_array_equal(sel.k.numpy(), expected_k)
    for t in range(len(logits)):
        k = expected_k[t]
        assert sel.indices[t, :k].tolist() == order[t, :k].tolist(), f"token {t}"
        np.testing.assert_array_equal(sel.weights[t, :k].numpy(), probs[t, order[t, :k]])
    assert sel.pvalues is None
    if min_k < max_k and p < 1:
        assert len(np.unique(expected_k)) >= 3, "the sample should exercise several different k"


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_p_router_uniform_logits_stop_exactly_at_p(dtype):
    # 8 equal logits: every probability is exactly 1/8, cumulative sums k/8 are exact.
    logits = torch.zeros(3, 8, dtype=dtype)
    for p, hand_k in [(0.25, 2), (0.25 + 1e-9, 3), (0.5, 4), (1.0, 8)]:
        sel = TopPRouter(8, p=p, min_k=1, max_k=8)(logits)
        assert sel.k.tolist() == [hand_k] * 3, p
        # Equal probabilities: the lower expert index comes first.
        assert sel.indices[0, :hand_k].tolist() == list(range(hand_k))


def test_top_p_router_p_one_selects_max_k_for_every_token():
    logits = torch.tensor([[5.0, -200.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [30.0, 0.0, -30.0, -60.0]])
    assert TopPRouter(4, p=1.0, min_k=1, max_k=3)(logits).k.tolist() == [3, 3, 3]
    assert TopPRouter(4, p=1.0, min_k=1, max_k=4)(logits).k.tolist() == [4, 4, 4]


def test_top_p_router_hand_worked_example():
    # probs = softmax(log([0.6, 0.25, 0.1, 0.05])) ~ [0.6, 0.25, 0.1, 0.05]; experts shuffled as [2, 0, 3, 1]
    # p = 0.8: 0.6 < 0.8, 0.85 >= 0.8 -> k = 2, experts 1 (0.6) then 3 (0.25).
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.05, 0.25]]))
    sel = TopPRouter(4, p=0.8, min_k=1, max_k=4, weights="none")(logits)
    assert sel.k.tolist() == [2]
    assert sel.indices.tolist() == [[1, 3, 4, 4]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.6, 0.25, 0.0, 0.0]]))
    # The same token with min_k = 3 takes a third expert; with max_k = 1 only the first.
    assert TopPRouter(4, p=0.8, min_k=3, max_k=4)(logits).indices.tolist() == [[1, 3, 0, 4]]
    assert TopPRouter(4, p=0.8, min_k=1, max_k=1)(logits).indices.tolist() == [[1]]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_top_p_router_takes_the_fewest_most_probable_experts_reaching_p(data):
    num_experts = data.draw(st.integers(1, 12), label="num_experts")
    tokens = data.draw(st.integers(1, 8), label="tokens")
    max_k = data.draw(st.integers(1, num_experts), label="max_k")
    min_k = data.draw(st.integers(1, max_k), label="min_k")
    p = data.draw(st.one_of(st.just(1.0), st.floats(1e-6, 1.0)), label="p")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    logits = data.draw(arrays(np.float32, (tokens, num_experts), elements=st.floats(-12, 12, width=32)),
                       label="logits")
    logits = torch.from_numpy(logits).to(dtype)

    sel = TopPRouter(num_experts, p=p, min_k=min_k, max_k=max_k)(logits)

    check_selection(sel, num_experts, min_k, max_k)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).double().numpy()
    for t in range(tokens):
        k = int(sel.k[t])
        chosen = sel.indices[t, :k].numpy()
        chosen_probs = probs[t, chosen]
        rest = np.delete(probs[t], chosen)
        assert rest.size == 0 or chosen_probs.min() >= rest.max(), "not the most probable experts"
        assert (np.diff(chosen_probs) <= 0).all(), "most probable first"
        cumulative = np.cumsum(chosen_probs)
        assert cumulative[-1] >= p or k == max_k, "stopped before reaching p"
        if p < 1:  # p = 1 is defined as every expert, even those whose probability underflowed to 0
            assert k == 1 or cumulative[-2] < p or k == min_k, "the last expert was not needed"


# --- higher criticism: the count --------------------------------------------------------------------

# HC_i = sqrt(N) (i/N - p_(i)) / sqrt(p_(i) (1 - p_(i))); N = 4 so sqrt(N) = 2.
HC_CASES = {
    # HC_1 = 2 (0.25 - 0.01) / sqrt(0.0099) = 4.824; HC_2 = 2 (0.5 - 0.04) / sqrt(0.0384) = 4.695
    "smallest p wins though the second is small too": ([0.01, 0.04, 0.5, 0.9], 0.5, 1),
    # ... and with alpha0 = 1: HC_3 = 2 (0.25) / 0.5 = 1.0, HC_4 = 2 (0.1) / 0.3 = 0.667 -> still 1
    "searching all ranks changes nothing here": ([0.01, 0.04, 0.5, 0.9], 1.0, 1),
    # HC = 1.835, 3.705, 5.330, 1.000 -> the maximum is at i = 3
    "three signals": ([0.05, 0.06, 0.07, 0.8], 1.0, 3),
    # alpha0 = 0.5 searches i = 1, 2 only -> 2
    "alpha0 caps the search": ([0.05, 0.06, 0.07, 0.8], 0.5, 2),
    # HC = 0.25, 0.873, 1.206, 1.633 -> all four (all p-values below their uniform expectation i/N)
    "maximum at the last rank": ([0.2, 0.3, 0.45, 0.6], 1.0, 4),
    # tied p = 0.1: HC = 1.0, 2.667, 4.333 (increasing inside the tie), HC_4 = 2 (0.4) / sqrt(0.24) = 1.633
    "a tie block is kept together": ([0.1, 0.1, 0.1, 0.6], 1.0, 3),
    "a tie block straddling the search limit is cut there": ([0.1, 0.1, 0.1, 0.6], 0.5, 2),
    # p = 0 gives HC = +inf; ties in the maximum go to the largest rank
    "all zero p-values are kept": ([0.0, 0.0, 0.5, 0.9], 1.0, 2),
    # HC_1 = 2 (0.25 - 0.3) / sqrt(0.21) = -0.218; p = 1 gives -inf -> 1
    "a negative maximum still picks its rank": ([0.3, 1.0, 1.0, 1.0], 1.0, 1),
    "p = 1 everywhere selects nothing": ([1.0, 1.0, 1.0, 1.0], 1.0, 0),
    # N = 1: floor(0.5 * 1) = 0 ranks, at least one is always searched
    "one expert": ([0.3], 0.5, 1),
}


@pytest.mark.parametrize("case", list(HC_CASES), ids=list(HC_CASES))
def test_hc_count_matches_hand_worked_examples(case):
    p, alpha0, hand_k = HC_CASES[case]
    assert reference_hc_count(np.asarray(p), alpha0) == hand_k  # the reference agrees with the hand
    assert hc_count(torch.tensor([p], dtype=torch.float64), alpha0).tolist() == [hand_k]


def reference_hc_count(sorted_p: np.ndarray, alpha0: float) -> int:
    """Donoho-Jin HC argmax over the first floor(alpha0 N) ranks, looping; ties to the larger rank."""
    n = sorted_p.size
    searched = max(1, int(np.floor(alpha0 * n + 1e-9)))
    best_rank, best = 0, -np.inf
    for i in range(1, searched + 1):
        p = float(sorted_p[i - 1])
        if p == 0.0:
            score = np.inf
        elif p == 1.0:
            score = -np.inf
        else:
            score = np.sqrt(n) * (i / n - p) / np.sqrt(p * (1 - p))
        if score > -np.inf and score >= best:
            best_rank, best = i, score
    return best_rank


@pytest.mark.parametrize("alpha0", [0.1, 0.25, 0.5, 0.57, 1.0])
@pytest.mark.parametrize("n", [1, 2, 8, 64, 100])
def test_hc_count_matches_numpy_reference(alpha0, n):
    rng = np.random.default_rng([n, int(alpha0 * 100)])
    null = rng.uniform(size=(300, n))
    signal = rng.uniform(size=(300, n)) * 10.0 ** rng.uniform(-6, 0, size=(300, 1))
    p = np.where(rng.uniform(size=(300, n)) < rng.uniform(size=(300, 1)), signal, null)
    p[:40] = np.round(p[:40], 1)  # ties, zeros and ones
    p = np.sort(p, axis=-1)
    expected = np.array([reference_hc_count(row, alpha0) for row in p])
    np.testing.assert_array_equal(hc_count(torch.from_numpy(p), alpha0).numpy(), expected)
    if math.floor(alpha0 * n + 1e-9) >= 4:
        assert len(np.unique(expected)) > 3, "the sample should exercise many different counts"


def test_hc_search_counts_0_57_of_100_as_57_ranks():
    # 0.57 * 100 = 56.99999999999999 in floating point; the search must still reach rank 57.
    p = torch.full((1, 100), 0.9, dtype=torch.float64)
    p[0, :57] = torch.linspace(1e-6, 1e-5, 57, dtype=torch.float64)
    assert hc_count(p, 0.57).tolist() == [57]


# --- higher criticism: the router -----------------------------------------------------------------


def test_hc_router_hand_worked_example_with_an_exact_null():
    # sf on grid [0, 1, 2, 3] is [0.8, 0.07, 0.06, 0.05]; logits on the grid give those p exactly
    # (up to float32 rounding). Logits [3, 0, 2, 1] -> p = [0.05, 0.8, 0.06, 0.07] -> sorted as "three signals"
    # above: k = 3 at alpha0 = 1 (experts 0, 2, 3 by ascending p), k = 2 at alpha0 = 0.5.
    null = TabulatedNull(grid=np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32),
                         sf=np.array([[0.8, 0.07, 0.06, 0.05]], dtype=np.float32), num_experts=4, min_pvalue=1e-6)
    logits = torch.tensor([[3.0, 0.0, 2.0, 1.0]])
    sel = HCRouter(4, null, min_k=1, max_k=4, alpha0=1.0)(logits)
    np.testing.assert_allclose(sel.pvalues.numpy(), [[0.05, 0.8, 0.06, 0.07]], rtol=1e-6)  # interpolation rounding
    assert sel.k.tolist() == [3] and sel.indices.tolist() == [[0, 2, 3, 4]]
    assert HCRouter(4, null, min_k=1, max_k=4)(logits).indices.tolist() == [[0, 2, 4, 4]]  # alpha0 = 0.5
    assert HCRouter(4, null, min_k=1, max_k=1, alpha0=1.0)(logits).indices.tolist() == [[0]]


def on_grid_logits(rng: np.random.Generator, tokens: int, num_experts: int) -> np.ndarray:
    """Distinct logits on the null's grid per token: mostly null-like, a random number of strong ones."""
    rows = []
    for _ in range(tokens):
        idx = rng.choice(np.arange(800, 1200), size=num_experts, replace=False)  # logits in [-2, 2)
        strong = rng.uniform(size=num_experts) < rng.uniform(0, 0.6)
        idx[strong] = rng.choice(np.arange(1250, 1600), size=int(strong.sum()), replace=False)
        rows.append(GRID[idx])
    return np.stack(rows)


@pytest.mark.parametrize("alpha0,min_k,max_k", [(0.5, 1, 16), (0.5, 2, 4), (1.0, 1, 16), (0.25, 1, 3), (0.5, 3, 3)])
def test_hc_router_selects_reference_hc_set_clamped(alpha0, min_k, max_k):
    num_experts = 16
    rng = np.random.default_rng(12)
    logits = on_grid_logits(rng, 400, num_experts)
    pvalues = NORMAL_SF[np.searchsorted(GRID, logits)]

    sel = HCRouter(num_experts, normal_null(num_experts), min_k=min_k, max_k=max_k, alpha0=alpha0)(
        torch.from_numpy(logits))

    check_selection(sel, num_experts, min_k, max_k)
    np.testing.assert_array_equal(sel.pvalues.numpy(), pvalues)
    experts = np.arange(num_experts)
    order = np.stack([np.lexsort((experts, -lg, p)) for p, lg in zip(pvalues, logits)])
    raw_k = np.array([reference_hc_count(np.sort(p.astype(np.float64)), alpha0) for p in pvalues])
    expected_k = np.clip(raw_k, min_k, max_k)
    np.testing.assert_array_equal(sel.k.numpy(), expected_k)
    for t in range(len(logits)):
        assert sel.indices[t, : expected_k[t]].tolist() == order[t, : expected_k[t]].tolist(), f"token {t}"
    if min_k > 1:
        assert (raw_k < min_k).any(), "the sample should exercise the min_k floor"
    if max_k < num_experts:
        assert (raw_k > max_k).any(), "the sample should exercise the max_k ceiling"


# --- the fast paths of the p-value routers ---------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_top_logit_order_equals_a_stable_descending_sort_ties_included(data):
    # Logits drawn from a few values (both zeros among them) so that ties are the rule, not the exception.
    num_experts = data.draw(st.integers(1, 40), label="num_experts")
    tokens = data.draw(st.integers(0, 20), label="tokens")
    k = data.draw(st.integers(1, num_experts), label="k")
    dtype = data.draw(st.sampled_from(DTYPES + [torch.float64]), label="dtype")
    values = [0.0, -0.0, 1.5, -1.5, 3.25, -1e30, 1e30, 2.0**-140]
    choice = data.draw(arrays(np.int64, (tokens, num_experts), elements=st.integers(0, len(values) - 1)))
    logits = torch.tensor(np.asarray(values)[choice], dtype=torch.float32).to(dtype)
    # numpy reference: descending value, ties to the lower index (-0.0 and 0.0 compare equal).
    expected = np.argsort(-logits.double().numpy(), axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top_logit_order(logits, k).numpy(), expected)


BH_EDGE_P = [0.5 / 64, 1 / 64, 2 / 64, 0.5, 1.0, 1e-30]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_bh_count_without_sorting_equals_scipy_bh_on_thresholds_and_ties(data):
    n = data.draw(st.integers(1, 64), label="n")
    alpha = data.draw(st.sampled_from([1e-6, 0.01, 0.05, 0.3, 0.7, 1.0]), label="alpha")
    tokens = data.draw(st.integers(1, 8), label="tokens")
    # p-values on the BH thresholds i * alpha / n themselves (ties with the threshold), repeated values,
    # and free ones; float32 like the routers' p-values.
    on_threshold = (np.arange(1, n + 1) * (alpha / n)).astype(np.float32)
    pool = np.concatenate([on_threshold, np.asarray(BH_EDGE_P, dtype=np.float32),
                           np.nextafter(on_threshold, np.float32(1))])
    p = data.draw(arrays(np.float32, (tokens, n), elements=st.one_of(
        st.sampled_from(pool.tolist()), st.floats(2.0**-40, 1.0, width=32))), label="p")
    got = bh_count_unsorted(torch.from_numpy(p), alpha)
    assert got.dtype == torch.long
    # Exactly the sorted step-up count, ties with the thresholds included ...
    np.testing.assert_array_equal(got.numpy(), bh_count(torch.sort(torch.from_numpy(p), dim=-1).values, alpha))
    # ... and scipy's count wherever scipy's own rounding (p * n / i <= alpha) cannot decide differently.
    thresholds = np.arange(1, n + 1) * (alpha / n)
    undecided = np.isclose(p.astype(np.float64)[..., None], thresholds, rtol=1e-9, atol=0).any(axis=(-1, -2))
    expected = (false_discovery_control(p.astype(np.float64), axis=-1, method="bh") <= alpha).sum(-1)
    np.testing.assert_array_equal(got.numpy()[~undecided], expected[~undecided])


class CountingNull:
    """A p-value null that counts how often its p-values are computed."""

    def __init__(self, null):
        self.null, self.calls, self.num_experts, self.monotone_in_logit = null, 0, null.num_experts, True

    def pvalues(self, logits, layer, temperature=1.0):
        self.calls += 1
        return self.null.pvalues(logits, layer, temperature)


@pytest.mark.parametrize("router_class", [BHRouter, HCRouter])
def test_fixed_k_p_value_routers_compute_pvalues_only_when_read(router_class):
    logits = torch.from_numpy(np.random.default_rng(17).normal(0, 2, size=(300, 12)).astype(np.float32))
    null = CountingNull(normal_null(12))
    params = {"alpha": 0.05} if router_class is BHRouter else {}
    sel = router_class(12, null, min_k=3, max_k=3, **params)(logits)
    assert null.calls == 0, "with min_k = max_k the selection does not depend on the p-values"
    np.testing.assert_array_equal(sel.indices.numpy(), np.argsort(-logits.numpy(), axis=-1, kind="stable")[:, :3])
    torch.testing.assert_close(sel.pvalues, null.null.pvalues(logits, 0), atol=0, rtol=0)
    assert null.calls == 1
    sel.pvalues  # read twice, computed once
    assert null.calls == 1


def test_bh_with_fixed_k_breaks_ties_like_the_variable_k_order():
    # Multiples of 1/4: many equal logits; min_k = max_k = 3 takes the first 3 of the same order that a
    # variable-k BH router uses (ascending p, ties to the larger logit, then the lower expert index).
    logits = torch.from_numpy(np.random.default_rng(19).integers(-8, 9, size=(400, 10)) / 4.0).float()
    fixed = BHRouter(10, normal_null(10), alpha=0.1, min_k=3, max_k=3)(logits)
    variable = BHRouter(10, normal_null(10), alpha=1.0, min_k=3, max_k=10)(logits)
    np.testing.assert_array_equal(fixed.indices.numpy(), variable.indices[:, :3].numpy())
    np.testing.assert_array_equal(fixed.indices.numpy(), np.argsort(-logits.numpy(), axis=-1, kind="stable")[:, :3])


# --- every router -----------------------------------------------------------------------------------

METHODS = ["topk", "topp", "bh", "hc"]


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_every_router_keeps_the_selection_contract(data):
    method = data.draw(st.sampled_from(METHODS), label="method")
    num_experts = data.draw(st.integers(1, 12), label="num_experts")
    tokens = data.draw(st.integers(0, 12), label="tokens")
    max_k = data.draw(st.integers(1, num_experts), label="max_k")
    min_k = max_k if method == "topk" else data.draw(st.integers(1, max_k), label="min_k")
    extra = {"p": data.draw(st.floats(1e-6, 1.0), label="p"), "alpha": data.draw(st.floats(1e-6, 1.0), label="alpha"),
             "alpha0": data.draw(st.floats(1e-3, 1.0), label="alpha0")}
    policy = data.draw(st.sampled_from(["model", "renormalize", "none"]), label="weights")
    norm_topk_prob = data.draw(st.booleans(), label="norm_topk_prob")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    logits = data.draw(arrays(np.float32, (tokens, num_experts), elements=st.floats(-12, 12, width=32)),
                       label="logits")

    router = make_router(method, num_experts, min_k, max_k, weights=policy, **extra)
    sel = router(torch.from_numpy(logits).to(dtype), norm_topk_prob=norm_topk_prob)

    check_selection(sel, num_experts, min_k, max_k)
    if router.needs_null:
        assert ((sel.pvalues > 0) & (sel.pvalues <= 1)).all()
    if tokens and (policy == "renormalize" or (policy == "model" and norm_topk_prob)):
        torch.testing.assert_close(sel.weights.sum(-1), torch.ones(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_every_router_refuses_nan_and_inf_logits_naming_layer_and_bad_tokens(method, dtype):
    router = make_router(method, 8, 1, 4)
    logits = torch.zeros(6, 8, dtype=dtype)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    logits[3, 5] = float("nan")
    logits[4, 7] = float("-inf")
    with pytest.raises(ValueError, match=r"layer 5: 3 of 6 tokens have NaN or infinite"):
        router(logits, layer=5)
    router(torch.zeros(6, 8, dtype=dtype), layer=5)  # finite logits still route


@pytest.mark.parametrize("method", METHODS)
def test_every_router_matches_itself_across_logit_dtypes_on_representable_logits(method):
    # Logits that bfloat16 and float16 hold exactly (multiples of 1/4 in [-4, 4]) route identically.
    rng = np.random.default_rng(13)
    logits = torch.from_numpy(rng.integers(-16, 17, size=(200, 8)) / 4.0).float()
    router = make_router(method, 8, 1, 4)
    reference = router(logits)
    for dtype in (torch.bfloat16, torch.float16):
        sel = router(logits.to(dtype))
        torch.testing.assert_close(sel.k, reference.k, atol=0, rtol=0)
        torch.testing.assert_close(sel.indices, reference.indices, atol=0, rtol=0)


# --- bad parameters ------------------------------------------------------------------------------------


def assert_names_key_value_and_range(build, key: str, value, valid: str) -> None:
    """``build()`` raises a RouterConfigError that starts with ``key``, shows ``value`` and says what is valid."""
    with pytest.raises(RouterConfigError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"{key}: ") and str(value) in message and valid in message, message


@pytest.mark.parametrize("kwargs,key,valid", [
    (dict(p=0.0), "p", "0 < p <= 1"),
    (dict(p=-0.2), "p", "0 < p <= 1"),
    (dict(p=1.01), "p", "0 < p <= 1"),
    (dict(p=float("nan")), "p", "0 < p <= 1"),
    (dict(p="0.5"), "p", "0 < p <= 1"),
    (dict(min_k=0), "min_k", "min_k >= 1"),
    (dict(min_k=5, max_k=4), "min_k", "min_k <= max_k"),
    (dict(max_k=9), "max_k", "max_k <= 8"),
    (dict(max_k=2.5), "max_k", "integer"),
    (dict(weights="softmax"), "weights", "model, renormalize, none"),
])
def test_top_p_router_rejects_bad_parameters_naming_key_value_and_range(kwargs, key, valid):
    assert_names_key_value_and_range(lambda: TopPRouter(8, **(dict(p=0.5, min_k=1, max_k=4) | kwargs)),
                                     key, kwargs[key], valid)


@pytest.mark.parametrize("kwargs,key,valid", [
    (dict(alpha0=0.0), "alpha0", "0 < alpha0 <= 1"),
    (dict(alpha0=1.5), "alpha0", "0 < alpha0 <= 1"),
    (dict(alpha0=float("nan")), "alpha0", "0 < alpha0 <= 1"),
    (dict(min_k=0), "min_k", "min_k >= 1"),
    (dict(min_k=5, max_k=4), "min_k", "min_k <= max_k"),
    (dict(max_k=9), "max_k", "max_k <= 8"),
    (dict(temperature=0.0), "temperature", "temperature > 0"),
    (dict(weights="softmax"), "weights", "model, renormalize, none"),
])
def test_hc_router_rejects_bad_parameters_naming_key_value_and_range(kwargs, key, valid):
    assert_names_key_value_and_range(lambda: HCRouter(8, normal_null(8), **(dict(min_k=1, max_k=4) | kwargs)),
                                     key, kwargs[key], valid)


def test_hc_router_rejects_null_with_wrong_expert_count():
    with pytest.raises(RouterConfigError, match=r"^null: fitted for 16 experts but the model has 8"):
        HCRouter(8, normal_null(16), min_k=1, max_k=4)


class WithinTokenNull:
    """A null for any expert count (num_experts None): p = (rank + 1) / (experts + 1), rank 0 the largest."""

    num_experts = None

    def pvalues(self, logits, layer, temperature=1.0):
        ranks = torch.argsort(torch.argsort(logits, dim=-1, descending=True), dim=-1)
        return (ranks.float() + 1) / (logits.shape[-1] + 1)


@pytest.mark.parametrize("router_class,params,hand_k", [
    # sorted p = i/9: HC_i = sqrt(8) (i/8 - i/9) / sqrt(i/9 (1 - i/9)) = sqrt(i / (9 - i)) / sqrt(8), increasing -> 8
    (HCRouter, dict(alpha0=1.0), 8),
    # BH at 0.5: i/9 <= i/16 never holds -> 0, clamped to min_k = 1
    (BHRouter, dict(alpha=0.5), 1),
])
def test_p_value_routers_accept_a_null_for_any_expert_count(router_class, params, hand_k):
    sel = router_class(8, WithinTokenNull(), min_k=1, max_k=8, **params)(torch.arange(8.0)[None])
    assert sel.k.tolist() == [hand_k]
    assert sel.indices[0, :hand_k].tolist() == list(range(7, 7 - hand_k, -1))


# --- registry and build_router -------------------------------------------------------------------------


def test_registry_names_every_router_and_which_need_a_null():
    assert {name: cls.needs_null for name, cls in ROUTERS.items()} == {
        "topk": False, "bh": True, "topp": False, "hc": True}


def test_build_router_topp_and_hc_from_specs():
    topp = build_router({"method": "topp", "p": 0.7, "min_k": 2, "max_k": 6, "weights": "none"}, 8, 2)
    assert isinstance(topp, TopPRouter)
    assert topp.describe() == {"method": "topp", "p": 0.7, "min_k": 2, "max_k": 6, "weights": "none"}
    hc = build_router({"method": "hc", "min_k": 1, "max_k": 4, "temperature": 2.0, "weights": "renormalize",
                       "alpha0": 0.25}, 8, 2, normal_null(8))
    assert isinstance(hc, HCRouter)
    assert hc.describe() == {"method": "hc", "min_k": 1, "max_k": 4, "weights": "renormalize",
                             "temperature": 2.0, "alpha0": 0.25}


@pytest.mark.parametrize("method", ["topp", "bh", "hc"])
def test_build_router_max_k_none_means_the_models_top_k(method):
    spec = {"topp": {"p": 0.5}, "bh": {"alpha": 0.1}, "hc": {}}[method] | {"method": method, "min_k": 1, "max_k": None}
    router = build_router(spec, num_experts=8, model_top_k=3, null=normal_null(8))
    assert router.max_k == 3 and router.min_k == 1


def test_build_router_hc_defaults_alpha0_to_one_half_and_needs_a_null():
    assert build_router({"method": "hc"}, 8, 2, normal_null(8)).alpha0 == 0.5
    with pytest.raises(RouterConfigError, match="needs a calibrated null"):
        build_router({"method": "hc"}, 8, 2)
    build_router({"method": "topp", "p": 0.5}, 8, 2)  # top-p needs no null


def test_build_router_reports_a_missing_p_and_does_not_read_zero_as_default():
    with pytest.raises(RouterConfigError, match=r"^p: missing"):
        build_router({"method": "topp"}, 8, 2)
    with pytest.raises(RouterConfigError, match=r"^min_k: 1 is greater than max_k = 0"):
        build_router({"method": "topp", "p": 0.5, "max_k": 0}, 8, 2)
    with pytest.raises(RouterConfigError, match=r"^k: 0"):
        build_router({"method": "topk", "k": 0}, 8, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_every_router_gives_the_same_selection_on_cuda(method):
    logits = torch.from_numpy(np.random.default_rng(14).normal(0, 2, size=(500, 16)).astype(np.float32))
    router = make_router(method, 16, 1, 6)
    cpu, cuda = router(logits), router(logits.cuda())
    torch.testing.assert_close(cuda.k.cpu(), cpu.k, atol=0, rtol=0)
    torch.testing.assert_close(cuda.indices.cpu(), cpu.indices, atol=0, rtol=0)
    torch.testing.assert_close(cuda.weights.cpu(), cpu.weights, atol=1e-6, rtol=1e-5)
