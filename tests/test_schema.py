"""One source for each routing fact: the rules' declarations, the generated schema file, the config's
defaults and validation, and build_router agree; a rule registered in one place reaches all of them."""

from __future__ import annotations

import pytest
import torch

from routelab import config, schema
from routelab.config import ConfigError, method_defaults, normalise_routing, routing_methods, routing_parameters
from routelab.model.experts import SUPPORTED_KERNELS
from routelab.routing import ROUTERS, Param, Router, build_router, register_router
from routelab.routing.nulls import NULL_KINDS, calibrated_kinds
from tests.support import REPO


def test_the_schema_file_is_the_one_the_registered_rules_generate():
    assert schema.SCHEMA_PATH == REPO / "workflow" / "schemas" / "routing.schema.yaml"
    assert schema.SCHEMA_PATH.read_text() == schema.schema_text(), \
        "routing.schema.yaml is stale: run python -m routelab.schema"
    assert schema.main(["--check"]) == 0


def test_config_reads_each_rules_declared_parameters_and_defaults():
    assert routing_methods() == tuple(ROUTERS)
    for method, cls in ROUTERS.items():
        assert method_defaults(method) == {p.name: p.default for p in cls.params}, method
    assert set(routing_parameters()) == {p.name for cls in ROUTERS.values() for p in cls.params}
    assert config.calibrated_nulls() == calibrated_kinds()


def test_schema_carries_each_parameters_type_range_and_description():
    defs = schema.routing_schema()["$defs"]
    for method, cls in ROUTERS.items():
        properties = defs[method]["properties"]
        assert list(properties) == ["name", "method", *(p.name for p in cls.params)]
        for param in cls.params:
            entry = properties[param.name]
            assert entry["default"] == param.default and entry["description"] == param.description
            bounded = entry["items"] if param.type is list else entry  # a list's range is its items'
            for key, value in (("minimum", param.minimum), ("exclusiveMinimum", param.exclusive_minimum),
                               ("maximum", param.maximum)):
                assert bounded.get(key) == value, (method, param.name, key)
            if param.choices:  # null too where the parameter is optional
                assert entry["enum"] == list(param.choices) + ([None] if param.default is None else [])
    assert defs["null_model"]["enum"] == list(NULL_KINDS)
    assert defs["experts_implementation"]["enum"] == [None, *SUPPORTED_KERNELS]


# What a rule needs given beyond its defaults (a group of alternatives of which one must be given).
REQUIRED = {"layerk": {"budget": 8}}


def test_normalised_configs_equal_what_build_router_resolves():
    for method, cls in ROUTERS.items():
        given = {"method": method, **REQUIRED.get(method, {})}
        spec = normalise_routing({"name": "x", **given})
        assert {k: v for k, v in spec.items() if k not in ("name", "method")} == cls.resolve(given)


def test_rules_that_need_one_of_several_keys_are_refused_without_it_before_any_job():
    for method, cls in ROUTERS.items():
        if any(group.default is None for group in cls.alternatives):
            assert method in REQUIRED
            with pytest.raises(ConfigError, match=r"routing: none of .* given; give exactly one of them"):
                normalise_routing({"name": "x", "method": method})
    with pytest.raises(ConfigError, match=r"routing: beta=0.3 and calibrate='median' given; give only one of beta, "
                                          r"calibrate"):
        normalise_routing({"name": "x", "method": "ratio", "beta": 0.3, "calibrate": "median"})


def test_calibration_needs_follow_the_rules_declarations():
    from routelab.config import uses_calibration

    cases = [({"method": "ratio"}, True), ({"method": "ratio", "beta": 0.5}, False), ({"method": "entropy"}, True),
             ({"method": "entropy", "thresholds": [1.0, 2.0, 3.0]}, False), ({"method": "layerk", "budget": 8}, True),
             ({"method": "layerk", "ks": [1, 2]}, False), ({"method": "bh"}, False), ({"method": "seqtopk"}, False)]
    for given, expected in cases:
        spec = normalise_routing({"name": "x", **given})
        assert uses_calibration(spec) is expected, given
        assert ROUTERS[given["method"]].uses_calibration(ROUTERS[given["method"]].resolve(given)) is expected, given


def test_the_docs_describe_every_rule_and_parameter():
    text = (REPO / "docs" / "routers.md").read_text()
    for method, cls in ROUTERS.items():
        assert f"`{method}`" in text, method
        for param in cls.params:
            assert f"`{param.name}`" in text, (method, param.name)


class Halving(Router):
    """A rule registered by a test: the first half of the model's top-k experts by probability."""

    method = "halving_test_rule"
    summary = "half the model's top-k"
    params = (Param("share", float, 0.5, "share of max_k to keep", exclusive_minimum=0, maximum=1),)

    def __init__(self, num_experts: int, share: float = 0.5):
        super().__init__(num_experts, max_k=num_experts, min_k=1)
        self.share = self.params[0].check(share)

    def rank(self, logits, layer, probs=None):
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
        keep = max(1, int(self.share * self.num_experts))
        return order, torch.full(logits.shape[:1], keep, dtype=torch.long), None


@pytest.fixture
def registered_rule():
    register_router(Halving)
    yield Halving
    del ROUTERS[Halving.method]


def test_a_rule_registered_in_one_place_is_built_validated_and_in_the_schema(registered_rule, tmp_path,
                                                                             monkeypatch):
    router = build_router({"method": "halving_test_rule", "share": 0.25}, num_experts=8, model_top_k=2)
    selection = router(torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 5.0, 4.0, -2.0]]))
    assert selection.k.tolist() == [2] and selection.indices[0, :2].tolist() == [5, 6]
    assert router.describe() == {"method": "halving_test_rule", "share": 0.25}
    generated = schema.routing_schema()["$defs"]
    assert "halving_test_rule" in generated["routing"]["properties"]["method"]["enum"]
    assert generated["halving_test_rule"]["properties"]["share"]["default"] == 0.5
    # the config reads the regenerated schema file
    file = tmp_path / "routing.schema.yaml"
    assert schema.main(["--out", str(file)]) == 0
    monkeypatch.setattr(config, "ROUTING_SCHEMA", file)
    config._routing_defs.cache_clear()
    try:
        assert normalise_routing({"name": "h", "method": "halving_test_rule"}) == {
            "name": "h", "method": "halving_test_rule", "share": 0.5}
        with pytest.raises(ConfigError, match="'alpha' is not a parameter of method 'halving_test_rule'"):
            normalise_routing({"name": "h", "method": "halving_test_rule", "alpha": 0.1})
    finally:
        config._routing_defs.cache_clear()
