"""Every router on every experts kernel in bfloat16 and float16 on CPU: the variable-k path (compacting
experts kernel) runs, gives finite logits, and where a rule selects the model's k for every token it
reproduces the native top-k forward in that dtype."""

from __future__ import annotations

import pytest
import torch

from routelab.model.patching import install_router
from routelab.routing import ROUTERS, build_router
from routelab.routing.nulls import fit_kde_null
from tests.support.models import KERNELS, SelectionCapture, batch

LOW_PRECISION = [torch.bfloat16, torch.float16]
EXPERTS, TOP_K = 8, 2

# Per rule, a config on the variable-k path (min_k < max_k, so the compacting kernel runs) that still
# selects the model's k for every token, where the rule can: then the output must be native top-k's.
SATURATING = {
    "bh": {"alpha": 1.0, "min_k": 1},  # BH at level 1 passes every expert; the clamp keeps max_k
    "topp": {"p": 1.0, "min_k": 1},
    "minp": {"m": 0.0, "min_k": 1},
    "ratio": {"beta": 0.0, "min_k": 1},
    "entropy": {"ks": [1, TOP_K], "thresholds": [0.0]},  # a spread router distribution has entropy > 0
    "seqtopk": {"budget": float(TOP_K), "min_k": 1},
}
# Per rule, a config that gives several k values on the same tokens (the variable-k path proper).
VARIABLE = {
    "topk": {"k": 1},
    "bh": {"alpha": 0.5, "max_k": 4},
    "hc": {"max_k": 4},
    "topp": {"p": 0.5, "max_k": 4},
    "minp": {"m": 0.5, "max_k": 4},
    "ratio": {"calibrate": "median", "max_k": 4},
    "entropy": {"ks": [1, 2, 4]},
    "layerk": {"budget": 3, "max_k": 4},
    "seqtopk": {"budget": 2.0, "max_k": 4},
}


def load(path, kernel, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, experts_implementation=kernel, dtype=dtype).eval()


@pytest.fixture(scope="module")
def calibration(tiny_olmoe_dir):
    """The float32 model's router logits on other inputs: the null and the calibrated rules' statistics."""
    model = load(tiny_olmoe_dir, "eager", torch.float32)
    with torch.no_grad():
        out = model(input_ids=batch(seed=100, size=(8, 32)), output_router_logits=True)
    logits = [layer.numpy() for layer in out.router_logits]
    return logits, fit_kde_null(logits, num_experts=EXPERTS, grid_size=512)


def routed(model, spec, calibration, capture=None):
    logits, null = calibration
    router = build_router(spec, EXPERTS, TOP_K, null=null, calibration=logits)
    with torch.no_grad(), install_router(model, router, recorder=capture):
        return model(input_ids=batch(seed=3, size=(2, 16))).logits.float()


def test_the_tables_cover_every_rule():
    assert set(VARIABLE) == set(ROUTERS)
    assert set(SATURATING) <= set(ROUTERS)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", sorted(SATURATING))
def test_k_everywhere_on_the_variable_path_equals_native_topk(tiny_olmoe_dir, calibration, method, kernel, dtype):
    model = load(tiny_olmoe_dir, kernel, dtype)
    with torch.no_grad():
        native = model(input_ids=batch(seed=3, size=(2, 16))).logits.float()
    capture = SelectionCapture()
    logits = routed(model, {"method": method, **SATURATING[method]}, calibration, capture)
    assert all((s.k == TOP_K).all() for s in capture.selections.values())
    assert torch.isfinite(logits).all()
    # Same experts and weights, and the sum over a token's experts runs in float32 on both paths before
    # the one rounding to the model's dtype: the forward is the native one bit for bit.
    torch.testing.assert_close(logits, native, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", sorted(VARIABLE))
def test_variable_k_in_low_precision_is_finite(tiny_olmoe_dir, calibration, method, kernel, dtype):
    capture = SelectionCapture()
    logits = routed(load(tiny_olmoe_dir, kernel, dtype), {"method": method, **VARIABLE[method]}, calibration, capture)
    assert not torch.isnan(logits).any() and torch.isfinite(logits).all()
    ks = torch.cat([s.k for s in capture.selections.values()])
    if method != "topk":
        assert len(ks.unique()) >= 2, f"{method}: one k only ({ks.unique().tolist()}); the test needs variable k"
