"""The router contract: the selection every rule returns, weight policies, parameter checks naming the
key, the registry and build_router."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from routelab.routing import ROUTERS, BHRouter, HCRouter, Param, RouterConfigError, TopKRouter, TopPRouter, build_router
from routelab.routing.nulls import Null
from tests.support.routing import DTYPES, check_selection, normal_null


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








# Parameter values the shared checks use where a rule takes them; any other parameter keeps its default.
CHECK_VALUES = {"p": 0.6, "alpha": 0.1, "alpha0": 0.5, "m": 0.2, "beta": 0.3}
LAYERS = 6  # the p-value rules' null and the calibrated rules' statistics cover layers 0..5


def fixed_k(method: str) -> bool:
    """A rule without a clamp whose k is its one size parameter (topk)."""
    return "k" in {p.name for p in ROUTERS[method].params}


def clamp_spec(method: str, min_k: int, max_k: int) -> dict:
    """Parameters that make ``method`` select between ``min_k`` and ``max_k`` experts, with both reachable."""
    if fixed_k(method):
        return {"k": max_k}
    if method == "entropy":  # a ladder from min_k to max_k, thresholds fitted to the calibration logits
        return {"ks": sorted({min_k, (min_k + max_k) // 2, max_k})}
    if method == "layerk":
        return {"ks": [min_k, max_k] * (LAYERS // 2), "min_k": min_k, "max_k": max_k}
    if method == "seqtopk":
        return {"budget": (min_k + max_k) / 2, "min_k": min_k, "max_k": max_k}
    return {"min_k": min_k, "max_k": max_k}


def calibration_for(num_experts: int, seed: int = 21) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 2, size=(400, num_experts)).astype(np.float32) for _ in range(LAYERS)]


def make_router(method: str, num_experts: int, min_k: int, max_k: int, weights: str = "model", **extra):
    """A router of any registered rule with the given clamp (a fixed-k rule takes k = max_k), through
    build_router; p-value rules get an exact normal null, calibrated rules calibration logits."""
    cls = ROUTERS[method]
    names = {p.name for p in cls.params}
    values = {key: value for key, value in {**CHECK_VALUES, **extra}.items() if key in names}
    spec = {"method": method, "weights": weights, **values, **clamp_spec(method, min_k, max_k)}
    null = normal_null(num_experts, layers=LAYERS) if cls.needs_null else None
    return build_router(spec, num_experts, model_top_k=max_k, null=null, calibration=calibration_for(num_experts))


class CountingNull(Null):
    """A p-value null that counts how often its p-values are computed."""

    kind = "counting"

    def __init__(self, null):
        self.null, self.calls, self.num_experts, self.monotone_in_logit = null, 0, null.num_experts, True

    def pvalues(self, logits, layer, temperature=1.0):
        self.calls += 1
        return self.null.pvalues(logits, layer, temperature)


METHODS = list(ROUTERS)  # every registered rule keeps the contract


def assert_names_key_value_and_range(build, key: str, value, valid: str) -> None:
    """``build()`` raises a RouterConfigError that starts with ``key``, shows ``value`` and says what is valid."""
    with pytest.raises(RouterConfigError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"{key}: ") and str(value) in message and valid in message, message


class WithinTokenNull(Null):
    """A null for any expert count (num_experts None): p = (rank + 1) / (experts + 1), rank 0 the largest."""

    kind, num_experts = "within-token ranks", None

    def pvalues(self, logits, layer, temperature=1.0):
        ranks = torch.argsort(torch.argsort(logits, dim=-1, descending=True), dim=-1)
        return (ranks.float() + 1) / (logits.shape[-1] + 1)


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
    assert sel.pvalues is not None  # read twice, computed once
    assert null.calls == 1


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_every_router_keeps_the_selection_contract(data):
    method = data.draw(st.sampled_from(METHODS), label="method")
    num_experts = data.draw(st.integers(1, 12), label="num_experts")
    tokens = data.draw(st.integers(0, 12), label="tokens")
    max_k = data.draw(st.integers(1, num_experts), label="max_k")
    min_k = max_k if fixed_k(method) else data.draw(st.integers(1, max_k), label="min_k")
    extra = {"p": data.draw(st.floats(1e-6, 1.0), label="p"), "alpha": data.draw(st.floats(1e-6, 1.0), label="alpha"),
             "alpha0": data.draw(st.floats(1e-3, 1.0), label="alpha0"), "m": data.draw(st.floats(0.0, 1.0), label="m"),
             "beta": data.draw(st.floats(0.0, 1.0), label="beta")}
    layer = data.draw(st.integers(0, LAYERS - 1), label="layer")
    policy = data.draw(st.sampled_from(["model", "renormalize", "none"]), label="weights")
    norm_topk_prob = data.draw(st.booleans(), label="norm_topk_prob")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    logits = data.draw(arrays(np.float32, (tokens, num_experts), elements=st.floats(-12, 12, width=32)),
                       label="logits")

    router = make_router(method, num_experts, min_k, max_k, weights=policy, **extra)
    sel = router(torch.from_numpy(logits).to(dtype), layer=layer, norm_topk_prob=norm_topk_prob)

    check_selection(sel, num_experts, min_k, max_k)
    again = router(torch.from_numpy(logits).to(dtype), layer=layer, norm_topk_prob=norm_topk_prob)
    assert torch.equal(again.indices, sel.indices) and torch.equal(again.weights, sel.weights)  # deterministic
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


def test_registry_names_every_router_and_which_need_a_null():
    shipped = {"topk": False, "bh": True, "topp": False, "hc": True}
    assert {name: ROUTERS[name].needs_null for name in shipped} == shipped
    for name, cls in ROUTERS.items():  # every rule declares what the schema and the docs show
        assert cls.method == name and cls.summary and cls.params, name
        assert all(isinstance(param, Param) for param in cls.params), name


def test_build_router_topp_and_hc_from_specs():
    topp = build_router({"method": "topp", "p": 0.7, "min_k": 2, "max_k": 6, "weights": "none"}, 8, 2)
    assert isinstance(topp, TopPRouter)
    assert topp.describe() == {"method": "topp", "p": 0.7, "min_k": 2, "max_k": 6, "weights": "none"}
    hc = build_router({"method": "hc", "min_k": 1, "max_k": 4, "temperature": 2.0, "weights": "renormalize",
                       "alpha0": 0.25}, 8, 2, normal_null(8))
    assert isinstance(hc, HCRouter)
    assert hc.describe() == {"method": "hc", "min_k": 1, "max_k": 4, "weights": "renormalize",
                             "temperature": 2.0, "alpha0": 0.25, "null_model": "kde"}


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


def test_build_router_fills_the_declared_defaults_and_does_not_read_zero_as_default():
    # A parameter left out takes the default its rule declares, the same one the config schema fills in.
    assert build_router({"method": "topp"}, 8, 2).p == 0.4 == TopPRouter.params[-1].default
    with pytest.raises(RouterConfigError, match=r"^p: 0 is out of range; valid: 0 < p <= 1"):
        build_router({"method": "topp", "p": 0}, 8, 2)
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
