"""Each routing rule against a hand-worked example and an independent reference: topk, bh, topp, hc."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import norm

from routelab.routing import BHRouter, HCRouter, TopKRouter, TopPRouter
from routelab.routing.nulls import TabulatedNull
from tests.support.routing import (
    DTYPES,
    GRID,
    NORMAL_SF,
    check_selection,
    check_selection_shape,
    normal_null,
    reference_hc_count,
    reference_order,
    scipy_bh_rejections,
)


def grid_logits(rng: np.random.Generator, tokens: int, num_experts: int) -> np.ndarray:
    """Logits that lie exactly on the null's grid (so interpolation is exact), distinct per token.

    Each token has a random number of strong experts (logit ~ 2..6) among null ones (logit ~ N(0, 1)).
    """
    weight_null = norm.pdf(GRID)
    weight_null /= weight_null.sum()
    rows = []
    for _ in range(tokens):
        idx = rng.choice(GRID.size, size=num_experts, replace=False, p=weight_null)
        strong = rng.uniform(size=num_experts) < rng.uniform(0, 0.6)
        idx[strong] = rng.choice(np.arange(1200, 1600), size=int(strong.sum()), replace=False)
        while len(set(idx.tolist())) < num_experts:  # keep logits distinct within the token
            dup = np.unique(idx, return_index=True)[1]
            redo = np.setdiff1d(np.arange(num_experts), dup)
            idx[redo] = rng.integers(0, GRID.size, size=redo.size)
        rows.append(GRID[idx])
    rows += [GRID[np.arange(1500, 1500 + num_experts)],  # every expert strongly significant
             GRID[np.arange(1000 - num_experts, 1000)]]  # nothing significant (p >= 0.5)
    return np.stack(rows)










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




def on_grid_logits(rng: np.random.Generator, tokens: int, num_experts: int) -> np.ndarray:
    """Distinct logits on the null's grid per token: mostly null-like, a random number of strong ones."""
    rows = []
    for _ in range(tokens):
        idx = rng.choice(np.arange(800, 1200), size=num_experts, replace=False)  # logits in [-2, 2)
        strong = rng.uniform(size=num_experts) < rng.uniform(0, 0.6)
        idx[strong] = rng.choice(np.arange(1250, 1600), size=int(strong.sum()), replace=False)
        rows.append(GRID[idx])
    return np.stack(rows)


@pytest.mark.parametrize("alpha,min_k,max_k", [(0.05, 1, 16), (0.05, 2, 4), (0.2, 3, 8), (0.5, 1, 2),
                                               (1.0, 1, 16), (0.01, 4, 4)])
def test_bh_router_selects_scipy_bh_set_clamped(alpha, min_k, max_k):
    num_experts = 16
    rng = np.random.default_rng(7)
    logits = grid_logits(rng, 400, num_experts)
    # On-grid logits: interpolation returns the tabulated value exactly.
    pvalues = NORMAL_SF[np.searchsorted(GRID, logits)].astype(np.float64)

    router = BHRouter(num_experts, normal_null(num_experts), alpha=alpha, min_k=min_k, max_k=max_k,
                      weights="none")
    sel = router(torch.from_numpy(logits))

    check_selection_shape(sel, num_experts, min_k, max_k)
    np.testing.assert_array_equal(sel.pvalues.numpy(), pvalues.astype(np.float32))
    expected_k = np.clip(scipy_bh_rejections(pvalues, alpha), min_k, max_k)
    np.testing.assert_array_equal(sel.k.numpy(), expected_k)
    order = reference_order(pvalues, logits)
    for t in range(len(logits)):
        k = expected_k[t]
        # Most preferred first: the k smallest p-values in ascending order.
        assert sel.indices[t, :k].tolist() == order[t, :k].tolist(), f"token {t}"
    clamped_low = scipy_bh_rejections(pvalues, alpha) < min_k
    clamped_high = scipy_bh_rejections(pvalues, alpha) > max_k
    if min_k > 1:
        assert clamped_low.any(), "the sample should exercise the min_k floor"
    if max_k < num_experts:
        assert clamped_high.any(), "the sample should exercise the max_k ceiling"


def test_bh_router_pvalues_follow_the_null_between_grid_points():
    logits = torch.from_numpy(np.random.default_rng(3).normal(0, 2.5, size=(300, 8)).astype(np.float32))
    sel = BHRouter(8, normal_null(8), alpha=0.1, min_k=1, max_k=8)(logits)
    # Linear interpolation error of norm.sf on a 0.01 grid is below h^2/8 * max|sf''| ~ 3e-6.
    np.testing.assert_allclose(sel.pvalues.numpy(), norm.sf(logits.double().numpy()), atol=1e-5, rtol=0)


def test_bh_router_temperature_divides_logits():
    logits = torch.from_numpy(np.random.default_rng(4).normal(0, 3, size=(50, 8)).astype(np.float32))
    sel = BHRouter(8, normal_null(8), alpha=0.1, min_k=1, max_k=8, temperature=2.0)(logits)
    np.testing.assert_allclose(sel.pvalues.numpy(), norm.sf(logits.double().numpy() / 2.0), atol=1e-5, rtol=0)


def test_bh_router_uses_the_layers_own_null():
    # Layer 1's null is the normal shifted by +3: the same logit is much less significant there.
    grid = np.stack([GRID, GRID])
    sf = np.stack([NORMAL_SF, norm.sf(GRID.astype(np.float64) - 3.0).astype(np.float32)])
    null = TabulatedNull(grid=grid, sf=sf, num_experts=4, min_pvalue=1e-30)
    logits = torch.tensor([[2.5, 0.0, -1.0, -2.0]])
    router = BHRouter(4, null, alpha=0.1, min_k=1, max_k=4)
    np.testing.assert_allclose(router(logits, layer=0).pvalues.numpy(), norm.sf(logits.numpy()), atol=1e-5)
    np.testing.assert_allclose(router(logits, layer=1).pvalues.numpy(), norm.sf(logits.numpy() - 3), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_bh_router_selection_invariants(data):
    num_experts = data.draw(st.integers(1, 12), label="num_experts")
    tokens = data.draw(st.integers(1, 16), label="tokens")
    max_k = data.draw(st.integers(1, num_experts), label="max_k")
    min_k = data.draw(st.integers(1, max_k), label="min_k")
    alpha = data.draw(st.floats(1e-6, 1.0, exclude_min=False), label="alpha")
    policy = data.draw(st.sampled_from(["model", "renormalize", "none"]), label="weights")
    norm_topk_prob = data.draw(st.booleans(), label="norm_topk_prob")
    logits = data.draw(arrays(np.float32, (tokens, num_experts),
                              elements=st.floats(-12, 12, width=32)), label="logits")

    router = BHRouter(num_experts, normal_null(num_experts), alpha=alpha, min_k=min_k, max_k=max_k,
                      weights=policy)
    sel = router(torch.from_numpy(logits), norm_topk_prob=norm_topk_prob)

    check_selection_shape(sel, num_experts, min_k, max_k)
    assert ((sel.pvalues > 0) & (sel.pvalues <= 1)).all()
    if policy == "renormalize" or (policy == "model" and norm_topk_prob):
        torch.testing.assert_close(sel.weights.sum(-1), torch.ones(tokens), atol=1e-5, rtol=0)


def test_bh_with_min_k_equal_max_k_equals_topk():
    num_experts, k = 16, 4
    logits = torch.from_numpy(np.random.default_rng(5).normal(0, 2, size=(500, num_experts)).astype(np.float32))
    bh = BHRouter(num_experts, normal_null(num_experts), alpha=0.05, min_k=k, max_k=k)(logits)
    topk = TopKRouter(num_experts, k)(logits)
    expected = np.argsort(-logits.numpy(), axis=-1, kind="stable")[:, :k]  # numpy reference top-k
    np.testing.assert_array_equal(topk.indices.numpy(), expected)
    np.testing.assert_array_equal(bh.indices.numpy(), expected)
    assert (bh.k == k).all() and (topk.k == k).all()
    torch.testing.assert_close(bh.weights, topk.weights, atol=0, rtol=0)


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


def test_bh_with_fixed_k_breaks_ties_like_the_variable_k_order():
    # Multiples of 1/4: many equal logits; min_k = max_k = 3 takes the first 3 of the same order that a
    # variable-k BH router uses (ascending p, ties to the larger logit, then the lower expert index).
    logits = torch.from_numpy(np.random.default_rng(19).integers(-8, 9, size=(400, 10)) / 4.0).float()
    fixed = BHRouter(10, normal_null(10), alpha=0.1, min_k=3, max_k=3)(logits)
    variable = BHRouter(10, normal_null(10), alpha=1.0, min_k=3, max_k=10)(logits)
    np.testing.assert_array_equal(fixed.indices.numpy(), variable.indices[:, :3].numpy())
    np.testing.assert_array_equal(fixed.indices.numpy(), np.argsort(-logits.numpy(), axis=-1, kind="stable")[:, :3])


def test_topk_skip_top_drops_the_best_experts_and_keeps_their_neighbours_weights():
    # logits of 4 experts; probabilities softmax([2, 0, 1, -1]) = [0.6439, 0.0871, 0.2369, 0.0321]
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    probs = np.exp([2.0, 0.0, 1.0, -1.0]) / np.exp([2.0, 0.0, 1.0, -1.0]).sum()
    selection = TopKRouter(4, k=3, skip_top=1)(logits)
    # the top-3 are experts 0, 2, 1; without the best one: 2 then 1, with their own probabilities
    assert selection.indices.tolist() == [[2, 1]]
    assert selection.k.tolist() == [2]
    np.testing.assert_allclose(selection.weights.numpy(), [[probs[2], probs[1]]], rtol=1e-6)
    renormalised = TopKRouter(4, k=3, skip_top=1, weights="renormalize")(logits)
    np.testing.assert_allclose(renormalised.weights.numpy(), [[probs[2], probs[1]]] / (probs[2] + probs[1]),
                               rtol=1e-6)
    assert TopKRouter(4, k=3, skip_top=1).describe() == {"method": "topk", "k": 3, "skip_top": 1, "weights": "model"}


@pytest.mark.parametrize("skip_top", [3, 4, -1, True])
def test_topk_skip_top_out_of_range_is_refused_naming_it(skip_top):
    with pytest.raises(ValueError, match=r"skip_top: .* valid: 0 <= skip_top < k = 3"):
        TopKRouter(4, k=3, skip_top=skip_top)
