"""BH counted on the logits: exactly the count of the p-values, with none of them computed.

A per-layer tabulated null (kde, empirical) maps the logit to p by one non-increasing function, so
``p <= c_i`` is ``logit >= x_i`` for a cut ``x_i`` found once per layer. These tests hold the pieces to
their definitions: p never rises with the logit (exactly, in float32), the cuts are the smallest
passing float32 (checked against brute force over neighbouring floats), the rank lookup equals a
direct scan of the cuts, and a router counting on logits gives the same selection as the p-value
route, scipy's BH count, and no p-value computation unless a recorder reads them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import false_discovery_control

from routelab.nulls import TabulatedNull, fit_empirical_null, fit_kde_null
from routelab.routers import (BHRouter, FirstPassingRank, bh_count, bh_pvalue_cuts, float32_from_keys,
                              float32_order_keys, logit_cuts)

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


def scan_first_rank(x: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Reference: min{i : x >= cuts[i - 1]}, n + 1 if none, by comparing with every cut."""
    passes = x.float().unsqueeze(-1) >= cuts
    first = passes.int().argmax(dim=-1) + 1
    return torch.where(passes.any(dim=-1), first, cuts.numel() + 1)


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
        assert gaps.numel() and float((finite_cuts[-1] - finite_cuts[0]) / gaps.min()) > FirstPassingRank.MAX_CELLS / 1.25 - 1


class PValueOnly:
    """The same null seen only through its p-values (routers then count on p-values)."""

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
    logits = torch.from_numpy(np.random.default_rng(3).choice(np.concatenate([steps, [-5.0, 5.0]]), size=(50, 64))).float()
    selection = router(logits)
    assert not router._first_rank[("cpu", 0)].usable and counting.calls == 1
    expected = bh_count(torch.sort(null.pvalues(logits, 0), dim=-1).values, 1.0).clamp(1, 64)
    assert torch.equal(selection.k, expected)
