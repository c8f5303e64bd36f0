"""The training-free rules of the literature (minp, ratio, entropy, layerk, seqtopk) against hand-worked
examples and independent loop-and-numpy references; their bad parameters named with key, value and range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.routing import ROUTERS, RouterConfigError, build_router
from routelab.routing.rules.layerk import spread_budget
from routelab.routing.rules.seqtopk import SeqTopKRouter
from tests.support.routing import check_selection


def logits_of(probs) -> torch.Tensor:
    """Logits whose float32 softmax is ``probs`` (rows), up to rounding."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


def build(spec, num_experts=4, top_k=4, calibration=None):
    return build_router(spec, num_experts, top_k, calibration=calibration)


# ---- minp ---------------------------------------------------------------------------------------------

PROBS = [[0.5, 0.25, 0.15, 0.1], [0.1, 0.15, 0.25, 0.5], [0.26, 0.24, 0.26, 0.24]]


@pytest.mark.parametrize("m,ks", [(0.4, [2, 2, 4]), (0.25, [3, 3, 4]), (0.95, [1, 1, 2]), (0.0, [4, 4, 4]),
                                  (1.0, [1, 1, 2])])
def test_minp_hand_worked(m, ks):
    # Row 0: p >= m * 0.5; row 1 the same distribution reversed; row 2: two experts tie at the top.
    sel = build({"method": "minp", "m": m})(logits_of(PROBS))
    assert sel.k.tolist() == ks
    assert sel.indices[0, : ks[0]].tolist() == [0, 1, 2, 3][: ks[0]]
    assert sel.indices[1, : ks[1]].tolist() == [3, 2, 1, 0][: ks[1]]
    assert sel.indices[2, :2].tolist() == [0, 2]  # equal top probabilities: the lower index first


def test_minp_clamps_to_min_k_and_max_k():
    sel = build({"method": "minp", "m": 0.95, "min_k": 2, "max_k": 3})(logits_of(PROBS))
    assert sel.k.tolist() == [2, 2, 2]
    assert build({"method": "minp", "m": 0.0, "max_k": 3})(logits_of(PROBS)).k.tolist() == [3, 3, 3]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_minp_keeps_exactly_the_experts_within_m_of_the_largest(data):
    experts = data.draw(st.integers(2, 10))
    x = np.array(data.draw(st.lists(st.floats(-6, 6, width=32), min_size=experts, max_size=experts)), np.float32)
    m = data.draw(st.floats(0.0, 1.0))
    max_k = data.draw(st.integers(1, experts))
    sel = build({"method": "minp", "m": m, "max_k": max_k}, experts, max_k)(torch.from_numpy(x)[None])
    probs = torch.softmax(torch.from_numpy(x), -1, dtype=torch.float32).numpy()
    passing = int((probs >= np.float32(m) * probs.max()).sum())  # float32, as routing decides
    assert sel.k.item() == min(max(passing, 1), max_k)
    order = np.lexsort((np.arange(experts), -x))  # descending logit, ties to the lower index
    assert sel.indices[0, : sel.k.item()].tolist() == order[: sel.k.item()].tolist()


# ---- ratio --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta,ks", [(0.4, [2, 2, 4]), (0.55, [1, 1, 4]), (0.0, [4, 4, 4])])
def test_ratio_walks_the_top_experts_and_stops_at_the_first_below_beta_w1(beta, ks):
    # Row 0's walk at beta 0.4: 0.5, 0.25 (>= 0.2), 0.15 (< 0.2): stop; k = 2. Row 2: all >= 0.55 * 0.26.
    assert build({"method": "ratio", "beta": beta})(logits_of(PROBS)).k.tolist() == ks


@settings(max_examples=80, deadline=None)
@given(beta=st.floats(0.0, 1.0), max_k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_ratio_with_fixed_beta_equals_minp_cut_at_max_k(beta, max_k, seed):
    logits = torch.from_numpy(np.random.default_rng(seed).normal(0, 2, (50, 8)).astype(np.float32))
    ratio = build({"method": "ratio", "beta": beta, "max_k": max_k}, 8, 8)(logits)
    minp = build({"method": "minp", "m": beta, "max_k": max_k}, 8, 8)(logits)
    assert torch.equal(ratio.k, minp.k) and torch.equal(ratio.indices, minp.indices)


def test_ratio_calibrate_median_is_the_median_of_w2_over_w1_per_layer():
    # Layer 0's calibration tokens have w2 / w1 = 0.2, 0.5 and 0.9 -> median 0.5; layer 1's 0.1, 0.3 -> 0.2.
    def tokens(ratios):
        return np.log(np.array([[1.0, r, 0.01, 0.01] for r in ratios]))

    router = build({"method": "ratio", "calibrate": "median"}, calibration=[tokens([0.2, 0.9, 0.5]),
                                                                              tokens([0.1, 0.3])])
    assert router.describe()["beta"] == pytest.approx([0.5, 0.2], abs=1e-6)
    probs = [[0.5, 0.2, 0.2, 0.1]]  # w2 / w1 = 0.4: skipped under layer 0's beta, kept under layer 1's
    assert router(logits_of(probs), layer=0).k.tolist() == [1]
    assert router(logits_of(probs), layer=1).k.tolist() == [3]


def test_ratio_defaults_to_calibrate_median_and_needs_calibration_logits():
    with pytest.raises(RouterConfigError, match="calibration"):
        build({"method": "ratio"})
    with pytest.raises(RouterConfigError, match=r"beta=0\.5 and calibrate='median' given; give only one"):
        build({"method": "ratio", "beta": 0.5, "calibrate": "median"})


# ---- entropy ------------------------------------------------------------------------------------------

def test_entropy_ladder_hand_worked():
    # Entropies: ~0 (one expert), ln 2 = 0.693 (two equal), ln 4 = 1.386 (four equal).
    probs = [[1 - 3e-6, 1e-6, 1e-6, 1e-6], [0.5, 0.5, 1e-9, 1e-9], [0.25] * 4]
    sel = build({"method": "entropy", "ks": [1, 2, 4], "thresholds": [0.5, 1.0]})(logits_of(probs))
    assert sel.k.tolist() == [1, 2, 4]
    assert sel.indices[1, :2].tolist() == [0, 1]
    assert build({"method": "entropy", "ks": [1, 2, 4], "thresholds": [0.7, 1.0]})(logits_of(probs)).k.tolist() \
        == [1, 1, 4]  # ln 2 < 0.7: not above the first threshold


def test_entropy_quantiles_are_the_numpy_quantiles_of_the_calibration_entropy():
    rng = np.random.default_rng(3)
    calibration = [rng.normal(0, s, size=(1000, 8)) for s in (0.5, 3.0)]
    router = build({"method": "entropy", "ks": [1, 2, 4], "quantiles": [0.3, 0.8]}, 8, 4, calibration)
    for layer, values in enumerate(calibration):
        p = np.exp(values - values.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        entropy = -(p * np.log(p)).sum(-1)
        assert router.describe()["thresholds"][layer] == pytest.approx(np.quantile(entropy, [0.3, 0.8]), rel=1e-5)
    # On the calibration tokens themselves about 30 % / 50 % / 20 % get 1 / 2 / 4 experts.
    k = router(torch.from_numpy(calibration[1]).float(), layer=1).k.numpy()
    assert [np.mean(k == v) for v in (1, 2, 4)] == pytest.approx([0.3, 0.5, 0.2], abs=0.01)


def test_entropy_defaults_to_a_ladder_to_the_models_k_and_even_quantiles():
    calibration = [np.random.default_rng(4).normal(size=(500, 8))]
    router = build({"method": "entropy"}, 8, 8, calibration)
    assert router.ks == [1, 2, 4, 8] and router.quantiles == [0.25, 0.5, 0.75]
    assert build({"method": "entropy"}, 8, 6, calibration).ks == [1, 2, 4, 6]


@pytest.mark.parametrize("spec,match", [
    ({"ks": [4, 2], "thresholds": [0.5]}, r"^ks: \[4, 2\] is not valid; valid: strictly ascending"),
    ({"ks": [1, 2], "thresholds": [0.5, 1.0]}, r"^thresholds: .* has 2 values; need len\(ks\) - 1 = 1"),
    ({"ks": [1, 9], "thresholds": [0.5]}, r"^ks: \[1, 9\] is not valid; each k must be <= 8"),
    ({"ks": [0, 2], "thresholds": [0.5]},
     r"^ks: \[0, 2\] is not valid; valid: a non-empty list of integers, each >= 1"),
    ({"ks": [1, 2], "thresholds": [-1.0]}, r"^thresholds: \[-1.0\] is not valid; valid: .*each >= 0"),
    ({"ks": [1, 2], "quantiles": [1.5]}, r"^quantiles: \[1.5\] is not valid; valid: .*0 < each <= 1"),
    ({"ks": [1, 2], "thresholds": [0.5], "quantiles": [0.5]}, r"give only one of thresholds, quantiles"),
])
def test_entropy_rejects_bad_parameters_naming_key_value_and_range(spec, match):
    with pytest.raises(RouterConfigError, match=match):
        build({"method": "entropy", **spec}, 8, 4, [np.zeros((4, 8))])


# ---- layerk -------------------------------------------------------------------------------------------

def test_layerk_gives_each_layer_its_k():
    router = build({"method": "layerk", "ks": [1, 3]})
    logits = logits_of(PROBS)
    assert router(logits, layer=0).k.tolist() == [1, 1, 1]
    assert router(logits, layer=1).k.tolist() == [3, 3, 3]
    assert router(logits, layer=1).indices[1].tolist() == [3, 2, 1]
    assert router(logits, layer=0).indices[1].tolist() == [3, 4, 4]  # sentinel past the layer's k
    with pytest.raises(RouterConfigError, match=r"^ks: 2 values .* the model has 3 MoE layers"):
        router.check_layers(3)


@pytest.mark.parametrize("weights,budget,bounds,ks", [
    ([1, 1, 2], 8, (1, 8), [2, 2, 4]),  # exactly proportional
    ([1, 1, 10], 9, (1, 4), [3, 2, 4]),  # 0.75, 0.75, 7.5 -> layer 2 capped at 4, 5 left: 2.5 / 2.5, tie to layer 0
    ([1, 2, 3], 1, (1, 4), [1, 1, 1]),  # below what min_k allows: every layer at min_k
    ([1, 2, 3], 40, (1, 4), [4, 4, 4]),  # above what max_k allows
    ([5, 1, 1, 1], 10, (2, 8), [4, 2, 2, 2]),  # 6.25 / 1.25 x 3 -> the small ones lifted to 2, 4 left for layer 0
])
def test_spread_budget_hand_worked(weights, budget, bounds, ks):
    assert spread_budget(np.asarray(weights, float), budget, *bounds) == ks


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.floats(0.1, 50), min_size=1, max_size=16), budget=st.integers(1, 300),
       low=st.integers(1, 4), width=st.integers(0, 12))
def test_spread_budget_sums_to_the_budget_within_bounds(weights, budget, low, width):
    high = low + width
    ks = spread_budget(np.asarray(weights), budget, low, high)
    assert all(low <= k <= high for k in ks)
    assert sum(ks) == min(max(budget, low * len(ks)), high * len(ks))


def test_layerk_budget_follows_each_layers_router_perplexity():
    rng = np.random.default_rng(5)
    # Layer 0's router is near-uniform (perplexity ~8), layer 1's is peaked (perplexity ~1.5).
    calibration = [rng.normal(0, 0.1, (2000, 8)), rng.normal(0, 6.0, (2000, 8))]
    router = build({"method": "layerk", "budget": 8, "max_k": 8}, 8, 8, calibration)
    perplexity = []
    for values in calibration:
        p = np.exp(values - values.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        perplexity.append(math.exp(float((-(p * np.log(p)).sum(-1)).mean())))
    assert router.perplexity == pytest.approx(perplexity, rel=1e-4)
    assert router.ks == spread_budget(np.asarray(perplexity), 8, 1, 8) and sum(router.ks) == 8
    assert router.ks[0] > router.ks[1]


def test_layerk_rejects_bad_parameters_naming_key_value_and_range():
    with pytest.raises(RouterConfigError, match=r"^ks: \[1, 5\] is not valid; each k must be in \[min_k, max_k\] = "
                                                r"\[1, 4\]"):
        build({"method": "layerk", "ks": [1, 5]})
    with pytest.raises(RouterConfigError, match=r"^method 'layerk': none of ks, budget given; give exactly one"):
        build({"method": "layerk"})
    with pytest.raises(RouterConfigError, match=r"^budget: 0 is out of range; valid: budget >= 1"):
        build({"method": "layerk", "budget": 0}, calibration=[np.zeros((3, 4))])


# ---- seqtopk ------------------------------------------------------------------------------------------

def reference_seqtopk(probs: np.ndarray, budget: float, min_k: int, max_k: int) -> list[int]:
    """Loop reference: every token's min_k best, then the window's best remaining pairs one at a time."""
    tokens, experts = probs.shape
    order = [list(np.lexsort((np.arange(experts), -row))) for row in probs]
    k = [min_k] * tokens
    for _ in range(max(0, round(tokens * budget) - tokens * min_k)):
        best = None
        for t in range(tokens):
            if k[t] < max_k and (best is None or probs[t, order[t][k[t]]] > probs[best, order[best][k[best]]]):
                best = t
        if best is None:
            break
        k[best] += 1
    return k


def test_seqtopk_hand_worked():
    # 3 tokens x budget 2 = 6 pairs. Each token's best first (3), then of the rest 0.35 (t1), 0.3 and 0.3 (t2).
    probs = [[0.7, 0.1, 0.1, 0.1], [0.4, 0.35, 0.15, 0.1], [0.3, 0.3, 0.3, 0.1]]
    sel = build({"method": "seqtopk", "budget": 2, "max_k": 3})(logits_of(probs))
    assert sel.k.tolist() == [1, 2, 3]
    assert sel.indices.tolist() == [[0, 4, 4], [0, 1, 4], [0, 1, 2]]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 20), budget=st.floats(0.5, 6), min_k=st.integers(1, 3),
       extra=st.integers(0, 4))
def test_seqtopk_matches_the_loop_reference(seed, tokens, budget, min_k, extra):
    max_k = min(8, min_k + extra)
    logits = torch.from_numpy(np.random.default_rng(seed).normal(0, 2, (tokens, 8)).astype(np.float32))
    sel = build({"method": "seqtopk", "budget": budget, "min_k": min_k, "max_k": max_k}, 8, 8)(logits)
    probs = torch.softmax(logits, -1, dtype=torch.float32).numpy()
    assert sel.k.tolist() == reference_seqtopk(probs, budget, min_k, max_k)
    check_selection(sel, 8, min_k, max_k)


def test_seqtopk_windows_are_the_sequences_and_padding_takes_no_share():
    rng = np.random.default_rng(8)
    logits = torch.from_numpy(rng.normal(0, 2, (2 * 5, 8)).astype(np.float32))
    router = SeqTopKRouter(8, budget=3.0, min_k=1, max_k=8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # the second sequence is left-padded
    router.begin_forward(2, 5, mask, cached=0)
    k = router(logits).k.view(2, 5)
    alone = SeqTopKRouter(8, budget=3.0, min_k=1, max_k=8)
    assert k[0].tolist() == alone(logits[:5]).k.tolist()
    assert k[1, 2:].tolist() == alone(logits[7:]).k.tolist()  # the same as its 3 real tokens alone
    assert k[1, :2].tolist() == [1, 1] and int(k[1, 2:].sum()) == 9


def test_seqtopk_refuses_decode_steps():
    router = SeqTopKRouter(8, budget=2.0, min_k=1, max_k=4)
    with pytest.raises(RouterConfigError, match=r"seqtopk: a decode step \(12 tokens already in the KV cache\).*"
                                                r"teacher-forced"):
        router.begin_forward(1, 1, None, cached=12)
    assert ROUTERS["seqtopk"].teacher_forced and not any(
        cls.teacher_forced for name, cls in ROUTERS.items() if name != "seqtopk")


def test_seqtopk_inside_a_model_routes_each_sequence_and_refuses_generation(tiny_olmoe_dir):
    from routelab.model.patching import install_router
    from tests.support.models import SelectionCapture, batch, load_tiny

    model = load_tiny(tiny_olmoe_dir)
    inputs = batch(seed=5, size=(2, 10))
    router = SeqTopKRouter(8, budget=1.5, min_k=1, max_k=4)
    together, alone = SelectionCapture(), SelectionCapture()
    with torch.no_grad(), install_router(model, router, recorder=together):
        model(input_ids=inputs)
    with torch.no_grad(), install_router(model, router, recorder=alone):
        model(input_ids=inputs[1:])
    for layer in together.selections:
        k = together.selections[layer].k.view(2, 10)
        assert int(k[0].sum()) == int(k[1].sum()) == 15  # round(10 * 1.5) per sequence
        assert k[1].tolist() == alone.selections[layer].k.tolist()
    with torch.no_grad(), install_router(model, router):
        with pytest.raises(RouterConfigError, match="cannot route generation"):
            model.generate(inputs[:1], max_new_tokens=3, do_sample=False)
