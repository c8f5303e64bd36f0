"""Routers against independent references: scipy's BH, numpy top-k and hand-built nulls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import false_discovery_control, norm

from routelab.nulls import TabulatedNull
from routelab.routers import BHRouter, RouterConfigError, TopKRouter, bh_count

# A null whose survival function is the standard normal's: p = norm.sf(logit), up to interpolation.
GRID = np.linspace(-10.0, 10.0, 2001).astype(np.float32)
NORMAL_SF = norm.sf(GRID.astype(np.float64)).astype(np.float32)


def normal_null(num_experts: int, layers: int = 1) -> TabulatedNull:
    return TabulatedNull(grid=np.tile(GRID, (layers, 1)), sf=np.tile(NORMAL_SF, (layers, 1)),
                         num_experts=num_experts, min_pvalue=1e-30)


def scipy_bh_rejections(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Number of BH rejections per row, from scipy's adjusted p-values."""
    return (false_discovery_control(pvalues, axis=-1, method="bh") <= alpha).sum(axis=-1)


def reference_order(pvalues: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Experts per token by ascending p, ties by descending logit, then by expert index."""
    experts = np.arange(pvalues.shape[-1])
    return np.stack([np.lexsort((experts, -lg, p)) for p, lg in zip(pvalues, logits)])


def check_selection_shape(sel, num_experts: int, min_k: int, max_k: int) -> None:
    """Invariants every Selection must satisfy."""
    tokens = sel.k.shape[0]
    assert sel.indices.shape == sel.weights.shape == (tokens, max_k)
    assert sel.indices.dtype == torch.long and sel.k.dtype == torch.long
    assert ((sel.k >= min_k) & (sel.k <= max_k)).all()
    used = torch.arange(max_k) < sel.k.unsqueeze(-1)
    assert (sel.indices[~used] == num_experts).all(), "unused slots must hold the sentinel"
    assert (sel.weights[~used] == 0).all(), "unused slots must have weight 0"
    assert (sel.indices[used] >= 0).all() and (sel.indices[used] < num_experts).all()
    assert (sel.weights >= 0).all()
    for t in range(tokens):
        chosen = sel.indices[t, : sel.k[t]].tolist()
        assert len(set(chosen)) == len(chosen), f"token {t}: duplicate experts {chosen}"


# --- bh_count ------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("case", list(ADVERSARIAL), ids=list(ADVERSARIAL))
def test_bh_matches_scipy_reference_adversarial(case):
    p, alpha, hand_count = ADVERSARIAL[case]
    p = np.asarray(p, dtype=np.float64)
    assert scipy_bh_rejections(p[None], alpha)[0] == hand_count  # the hand count is right
    got = bh_count(torch.from_numpy(np.sort(p))[None], alpha)
    assert got.tolist() == [hand_count]


# --- BHRouter with a null whose p-values are known -----------------------------------------------


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


# --- weight policies -----------------------------------------------------------------------------


def softmax64(logits: torch.Tensor) -> np.ndarray:
    x = logits.double().numpy()
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def selected_probs(sel, probs: np.ndarray) -> np.ndarray:
    idx = sel.indices.numpy()
    used = idx < probs.shape[-1]
    return np.where(used, np.take_along_axis(probs, np.minimum(idx, probs.shape[-1] - 1), -1), 0.0)


@pytest.fixture
def router_logits():
    return torch.from_numpy(np.random.default_rng(6).normal(0, 2, size=(200, 8)).astype(np.float32))


def routers_for(policy: str) -> list:
    return [TopKRouter(8, 3, weights=policy),
            BHRouter(8, normal_null(8), alpha=0.2, min_k=1, max_k=6, weights=policy)]


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_weights_none_are_raw_softmax_probabilities(router_logits, norm_topk_prob):
    probs = softmax64(router_logits)
    for router in routers_for("none"):
        sel = router(router_logits, norm_topk_prob=norm_topk_prob)
        np.testing.assert_allclose(sel.weights.numpy(), selected_probs(sel, probs), atol=1e-6, rtol=1e-5)
        assert (sel.weights.sum(-1) < 1 - 1e-3).any(), "raw probabilities must not be renormalised"


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_weights_renormalize_sum_to_one(router_logits, norm_topk_prob):
    probs = softmax64(router_logits)
    for router in routers_for("renormalize"):
        sel = router(router_logits, norm_topk_prob=norm_topk_prob)
        raw = selected_probs(sel, probs)
        np.testing.assert_allclose(sel.weights.numpy(), raw / raw.sum(-1, keepdims=True), atol=1e-6, rtol=1e-5)


def test_weights_model_follow_norm_topk_prob(router_logits):
    probs = softmax64(router_logits)
    for router in routers_for("model"):
        raw_sel = router(router_logits, norm_topk_prob=False)
        raw = selected_probs(raw_sel, probs)
        np.testing.assert_allclose(raw_sel.weights.numpy(), raw, atol=1e-6, rtol=1e-5)
        norm_sel = router(router_logits, norm_topk_prob=True)
        np.testing.assert_allclose(norm_sel.weights.numpy(), raw / raw.sum(-1, keepdims=True), atol=1e-6, rtol=1e-5)


def test_topk_router_matches_native_olmoe_router_weights():
    # The native OLMoE router, written out: softmax in float32, top-k, optional renormalisation.
    logits = torch.from_numpy(np.random.default_rng(8).normal(0, 1, size=(100, 8)).astype(np.float32))
    for norm_topk_prob in (False, True):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        value, index = torch.topk(probs, 2, dim=-1)
        if norm_topk_prob:
            value = value / value.sum(-1, keepdim=True)
        sel = TopKRouter(8, 2)(logits, norm_topk_prob=norm_topk_prob)
        torch.testing.assert_close(sel.indices, index, atol=0, rtol=0)
        torch.testing.assert_close(sel.weights, value, atol=1e-7, rtol=1e-6)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,key", [
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(min_k=0), "min_k"),
    (dict(min_k=5, max_k=4), "min_k"),
    (dict(max_k=9), "max_k"),
    (dict(temperature=0.0), "temperature"),
    (dict(weights="softmax"), "weights"),
])
def test_bh_router_rejects_bad_parameters_naming_the_key(kwargs, key):
    params = dict(alpha=0.05, min_k=1, max_k=4) | kwargs
    with pytest.raises(RouterConfigError, match=key) as info:
        BHRouter(8, normal_null(8), **params)
    assert str(info.value).startswith(key), info.value


def test_bh_router_rejects_null_with_wrong_expert_count():
    with pytest.raises(RouterConfigError, match=r"null: .*16 experts.*8") as info:
        BHRouter(8, normal_null(16), alpha=0.05, min_k=1, max_k=4)
    assert "16" in str(info.value) and "8" in str(info.value)


def test_router_rejects_logits_of_wrong_shape():
    with pytest.raises(ValueError, match=r"\[tokens, 8\]"):
        TopKRouter(8, 2)(torch.zeros(4, 7))


def test_topk_router_rejects_k_above_num_experts_naming_k():
    with pytest.raises(RouterConfigError) as info:
        TopKRouter(8, 9)
    assert str(info.value).startswith("k: "), info.value
