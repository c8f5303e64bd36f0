"""Counting kernels against their references: BH against scipy (sorted, unsorted, in logit space),
top-p and higher-criticism counts, the stable top-k order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import false_discovery_control

from routelab.routing import BHRouter
from routelab.routing.counting import (
    FirstPassingRank,
    bh_count,
    bh_count_unsorted,
    bh_pvalue_cuts,
    float32_from_keys,
    float32_order_keys,
    hc_count,
    logit_cuts,
    top_logit_order,
    top_p_count,
)
from routelab.routing.nulls import Null, TabulatedNull, fit_empirical_null, fit_kde_null
from tests.support.routing import DTYPES, reference_hc_count, scipy_bh_rejections

# Dyadic thresholds (alpha = 0.5, N = 8 -> i/16) keep every comparison exact in float64.
ADVERSARIAL = {
    "ties straddling the threshold": ([0.1] * 5 + [0.9] * 3, 0.5, 5),  # p_(1) > 1/16 but p_(5) <= 5/16
    "tie exactly at a threshold": ([3 / 16] * 3 + [0.7] * 5, 0.5, 3),
    "tie just above a threshold": ([3 / 16 + 1e-12] * 3 + [0.7] * 5, 0.5, 0),
    "many equal p-values": ([0.04] * 8, 0.05, 8),
    "all significant": ([1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2], 0.05, 8),
    "none significant": ([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], 0.05, 0),
    "p = 1 everywhere": ([1.0] * 8, 0.05, 0),
    "p = 1 everywhere, alpha = 1": ([1.0] * 8, 1.0, 8),
    "single tiny p-value": ([1e-300] + [0.99] * 7, 0.05, 1),
    "later rank rescues earlier ones": ([0.02, 0.03, 0.04, 0.045, 0.9, 0.9, 0.9, 0.9], 0.1, 4),
    "p = 0": ([0.0] + [1.0] * 7, 0.01, 1),
}




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




BH_EDGE_P = [0.5 / 64, 1 / 64, 2 / 64, 0.5, 1.0, 1e-30]


NEG_INF, POS_INF = torch.tensor(-np.inf), torch.tensor(np.inf)


def random_table(rng: np.random.Generator, points: int, wiggle: bool) -> tuple[np.ndarray, np.ndarray]:
    """A survival-function table: knots evenly spaced or not, flat stretches, a steep drop, optionally one whose
    float rounding made it rise by a hair somewhere (the null must still give p that never rises)."""
    low = float(rng.normal(0, 3))
    grid = (np.linspace(low, low + float(rng.uniform(0.5, 20)), points) if rng.integers(2)
            else np.sort(rng.uniform(low, low + 10, size=points))).astype(np.float32)
    sf = np.sort(rng.uniform(size=points))[::-1]
    sf[rng.integers(points, size=points // 5)] = sf[0]  # flat stretches somewhere
    sf = np.sort(sf)[::-1]
    sf[points // 2:] *= 1e-7  # a steep drop: y0 + (y1 - y0) rounds below y1 there unless clamped
    sf = np.minimum.accumulate(sf).astype(np.float32)
    if wiggle and points > 3:
        i = int(rng.integers(1, points - 1))
        sf[i] = np.nextafter(sf[i - 1], np.float32(2))  # one float step up
    return grid, sf


def neighbours(values: torch.Tensor) -> torch.Tensor:
    """``values`` and the float32 one step below and above each."""
    values = values[torch.isfinite(values)].float()
    return torch.cat([values, torch.nextafter(values, NEG_INF), torch.nextafter(values, POS_INF)])


def scan_first_rank(x: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Reference: min{i : x >= cuts[i - 1]}, n + 1 if none, by comparing with every cut."""
    passes = x.float().unsqueeze(-1) >= cuts
    first = passes.int().argmax(dim=-1) + 1
    return torch.where(passes.any(dim=-1), first, cuts.numel() + 1)


class PValueOnly(Null):
    """The same null seen only through its p-values (routers then count on p-values)."""

    kind = "p-values only"

    def __init__(self, null):
        self.null, self.num_experts, self.monotone_in_logit, self.calls = null, null.num_experts, True, 0

    def pvalues(self, logits, layer, temperature=1.0):
        # Counts p-values of routed batches; the once-per-layer cut search evaluates single rows.
        self.calls += logits.shape[0] > 1
        return self.null.pvalues(logits, layer, temperature)


class CountingTabulated(PValueOnly):
    pointwise_in_logit = True


def fitted_nulls(rng: np.random.Generator, experts: int) -> dict[str, TabulatedNull]:
    layers = [rng.standard_t(4, size=(600, experts)) * 1.7 + 0.4, rng.normal(-1, 0.6, size=(600, experts))]
    return {"kde": fit_kde_null(layers, experts, grid_size=512), "empirical": fit_empirical_null(layers, experts, 256)}


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_bh_matches_scipy_reference(alpha, n):
    rng = np.random.default_rng([n, int(alpha * 100)])
    # Mix of uniform (null) p-values and small (signal) ones so every k from 0 to n occurs.
    null = rng.uniform(size=(500, n))
    signal = rng.uniform(size=(500, n)) * 10.0 ** rng.uniform(-6, 0, size=(500, 1))
    mask = rng.uniform(size=(500, n)) < rng.uniform(size=(500, 1))
    p = np.where(mask, signal, null)
    expected = scipy_bh_rejections(p, alpha)
    got = bh_count(torch.from_numpy(np.sort(p, axis=-1)), alpha).numpy()
    np.testing.assert_array_equal(got, expected)
    if n >= 8 and 0.05 <= alpha < 1:  # at alpha = 1 BH rejects everything
        assert len(np.unique(expected)) > 3, "the sample should exercise many different counts"


@pytest.mark.parametrize("case", list(ADVERSARIAL), ids=list(ADVERSARIAL))
def test_bh_matches_scipy_reference_adversarial(case):
    p, alpha, hand_count = ADVERSARIAL[case]
    p = np.asarray(p, dtype=np.float64)
    assert scipy_bh_rejections(p[None], alpha)[0] == hand_count  # the hand count is right
    got = bh_count(torch.from_numpy(np.sort(p))[None], alpha)
    assert got.tolist() == [hand_count]


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


@pytest.mark.parametrize("case", list(HC_CASES), ids=list(HC_CASES))
def test_hc_count_matches_hand_worked_examples(case):
    p, alpha0, hand_k = HC_CASES[case]
    assert reference_hc_count(np.asarray(p), alpha0) == hand_k  # the reference agrees with the hand
    assert hc_count(torch.tensor([p], dtype=torch.float64), alpha0).tolist() == [hand_k]


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


@pytest.mark.parametrize("kind", ["kde", "empirical"])
@pytest.mark.parametrize("seed", range(8))
def test_tabulated_pvalues_never_rise_with_the_logit_exactly(kind, seed):
    rng = np.random.default_rng(seed)
    grid, sf = random_table(rng, int(rng.integers(2, 400)), wiggle=seed % 2 == 1)
    if kind == "kde":  # the kde lookup assumes evenly spaced knots
        grid = np.linspace(grid[0], grid[-1], grid.size).astype(np.float32)
    null = TabulatedNull(grid=grid[None], sf=sf[None], num_experts=4, min_pvalue=1e-30, kind=kind)
    knots = torch.from_numpy(grid)
    x = torch.cat([neighbours(knots), neighbours(neighbours(knots)), torch.from_numpy(
        rng.uniform(grid[0] - 1, grid[-1] + 1, size=5000)).float(), torch.tensor([-1e30, 1e30])])
    for temperature in (1.0, 0.37):
        x_sorted = torch.sort(x).values
        p = null.pvalues(x_sorted.view(1, -1), 0, temperature).view(-1)
        rises = torch.nonzero(p[1:] > p[:-1])
        assert rises.numel() == 0, f"p rises after x = {x_sorted[rises[:3, 0]].tolist()}"


def test_order_keys_order_like_the_floats_and_invert():
    values = torch.tensor([-np.inf, -3.4e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 1.0, 2.5, 3.4e38, np.inf])
    keys = float32_order_keys(values)
    assert (keys[1:] >= keys[:-1]).all() and keys.dtype == torch.int32
    assert torch.equal(float32_from_keys(keys).view(torch.int32), values.view(torch.int32))  # bit-exact
    # consecutive floats have consecutive keys; -0.0 and +0.0 (equal values) are neighbours too
    finite = values[1:-1][values[1:-1].view(torch.int32) != (-0.0 * torch.ones(1)).view(torch.int32)]
    assert (float32_order_keys(torch.nextafter(finite, POS_INF)) - float32_order_keys(finite) == 1).all()
    assert int(float32_order_keys(torch.tensor(0.0)) - float32_order_keys(torch.tensor(-0.0))) == 1


@pytest.mark.parametrize("seed", range(6))
def test_logit_cuts_are_the_smallest_passing_float(seed):
    rng = np.random.default_rng(seed)
    grid, sf = random_table(rng, int(rng.integers(2, 200)), wiggle=False)
    null = TabulatedNull(grid=grid[None], sf=sf[None], num_experts=4, min_pvalue=1e-4, kind="empirical")
    temperature = float(rng.choice([1.0, 0.5, 3.0]))

    def pvalue_of(x):
        return null.pvalues(x.view(1, -1), 0, temperature).view(-1)

    # p-value cuts: random ones, the table's own values, and cuts that nothing or everything passes
    targets = torch.from_numpy(np.concatenate([rng.uniform(size=40), sf, [0.0, 1e-9, 1.0]])).float()
    cuts = logit_cuts(pvalue_of, targets)
    largest = torch.finfo(torch.float32).max
    for target, cut in zip(targets.tolist(), cuts.tolist()):
        if cut == np.inf:
            assert pvalue_of(torch.tensor([largest])).item() > target
        elif cut == -np.inf:
            assert pvalue_of(torch.tensor([-largest])).item() <= target
        else:
            below = torch.nextafter(torch.tensor([cut]), NEG_INF)
            assert pvalue_of(torch.tensor([cut])).item() <= target < pvalue_of(below).item(), (target, cut)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_first_passing_rank_equals_a_scan_of_the_cuts(data):
    n = data.draw(st.integers(1, 70), label="n")
    finite = st.floats(-50, 50, width=32, allow_subnormal=False)
    values = data.draw(st.lists(st.one_of(finite, st.sampled_from([np.inf, -np.inf, 0.0, 1.0, 1.0000001])),
                                min_size=n, max_size=n), label="cuts")
    cuts = torch.sort(torch.tensor(values, dtype=torch.float32), descending=True).values  # repeats allowed
    lookup = FirstPassingRank(cuts)
    x = torch.cat([neighbours(cuts), torch.tensor([-1e30, 1e30, 0.0, -0.0]),
                   torch.linspace(-60, 60, 997)])
    if lookup.usable:
        assert torch.equal(lookup(x.view(-1, 1)).view(-1), scan_first_rank(x, cuts))
    else:  # cuts closer than the table resolves: the caller must count on p-values instead
        finite_cuts = torch.unique(cuts[torch.isfinite(cuts)])
        gaps = finite_cuts[1:] - finite_cuts[:-1]
        spread = float((finite_cuts[-1] - finite_cuts[0]) / gaps.min())
        assert gaps.numel() and spread > FirstPassingRank.MAX_CELLS / 1.25 - 1


@pytest.mark.parametrize("kind", ["kde", "empirical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_bh_counted_on_logits_selects_exactly_as_on_pvalues(kind, dtype, seed):
    rng = np.random.default_rng(seed)
    experts = int(rng.integers(3, 40))
    null = fitted_nulls(rng, experts)[kind]
    alpha = float(rng.choice([1e-4, 0.05, 0.3, 0.7, 1.0]))
    temperature = float(rng.choice([1.0, 0.6, 2.0]))
    max_k = int(rng.integers(1, experts + 1))
    min_k = int(rng.integers(1, max_k + 1))
    layer = int(rng.integers(2))
    # Logits on the knots, on the logit cuts themselves and one float either side, and free ones.
    cuts = logit_cuts(lambda x: null.pvalues(x.view(1, -1), layer, temperature).view(-1),
                      bh_pvalue_cuts(experts, alpha))
    pool = torch.cat([neighbours(cuts), neighbours(torch.from_numpy(null.grid[layer]) * temperature)])
    chosen = pool[torch.from_numpy(rng.integers(pool.numel(), size=(300, experts)))]
    free = torch.from_numpy(rng.normal(0.5, 2, size=(300, experts))).float()
    logits = torch.cat([chosen, free]).to(dtype)
    counting = CountingTabulated(null)
    on_logits = BHRouter(experts, counting, alpha, min_k, max_k, temperature=temperature)(logits, layer)
    assert counting.calls == 0, "the count on logits computed p-values"
    on_pvalues = BHRouter(experts, PValueOnly(null), alpha, min_k, max_k, temperature=temperature)(logits, layer)
    assert torch.equal(on_logits.k, on_pvalues.k) and torch.equal(on_logits.indices, on_pvalues.indices)
    assert torch.equal(on_logits.weights, on_pvalues.weights)
    # the p-values a recorder reads are the null's, computed on demand, and give scipy's count
    pvalues = on_logits.pvalues
    assert counting.calls == 1 and torch.equal(pvalues, null.pvalues(logits, layer, temperature))
    sorted_p = torch.sort(pvalues, dim=-1).values
    expected = bh_count(sorted_p, alpha).clamp(min_k, max_k)
    assert torch.equal(on_logits.k, expected)
    scipy = (false_discovery_control(pvalues.double().numpy(), axis=-1) <= alpha).sum(-1)
    decided = ~np.isclose(pvalues.double().numpy()[..., None], np.arange(1, experts + 1) * alpha / experts,
                          rtol=1e-9, atol=0).any(axis=(-1, -2))
    np.testing.assert_array_equal(on_logits.k.numpy()[decided], scipy.clip(min_k, max_k)[decided])


def test_cuts_too_close_for_the_table_fall_back_to_pvalues():
    # An empirical table whose knots sit a float32 step or so apart near 0 and 500 apart elsewhere:
    # the logit cuts can land closer than the rank table resolves; the router must still count right.
    steps = np.float32(0.0) + np.arange(60, dtype=np.float32) * np.float32(np.finfo(np.float32).eps)
    grid = np.concatenate([[-1000.0, -500.0], steps, [1000.0]]).astype(np.float32)
    sf = np.linspace(1, 0, grid.size).astype(np.float32)
    null = TabulatedNull(grid=grid[None], sf=sf[None], num_experts=64, min_pvalue=1e-6, kind="empirical")
    counting = CountingTabulated(null)
    router = BHRouter(64, counting, alpha=1.0, min_k=1, max_k=64)
    values = np.concatenate([steps, [-5.0, 5.0]])
    logits = torch.from_numpy(np.random.default_rng(3).choice(values, size=(50, 64))).float()
    selection = router(logits)
    assert not router._first_rank[("cpu", 0)].usable and counting.calls == 1
    expected = bh_count(torch.sort(null.pvalues(logits, 0), dim=-1).values, 1.0).clamp(1, 64)
    assert torch.equal(selection.k, expected)
