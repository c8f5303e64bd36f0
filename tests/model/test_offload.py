"""A model spread by accelerate (``model.device_map``, CPU and disk offload) routes and records exactly as
the same model loaded whole: the router seam composes with accelerate's hooks."""

from __future__ import annotations

import pytest
import torch

from routelab.model.families import moe_shape
from routelab.model.loading import ModelPlacement
from routelab.model.patching import install_router
from routelab.routing import BHRouter, TopKRouter
from routelab.routing.nulls import fit_kde_null
from tests.model.test_families import own_score_null
from tests.support.families import CASES
from tests.support.models import batch, seed_everything

pytest.importorskip("accelerate")


class Recorded:
    """Every layer's router logits and selection, in call order."""

    def __init__(self):
        self.calls = []

    def record(self, layer, router_logits, selection):
        self.calls.append((layer, router_logits.clone(), selection.indices.clone(), selection.weights.clone()))


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.support.families import COMMON

    seed_everything(0)
    config = AutoConfig.for_model("deepseek_v3", **{**COMMON, **CASES["deepseek_v3"][1]})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    path = tmp_path_factory.mktemp("deepseek_v3")
    model.save_pretrained(path)
    return str(path)


# Layer 0 and the embedding stay on the CPU; layer 1 and the head live on disk until their forward.
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}


def routed(model, router, inputs):
    recorded = Recorded()
    with torch.no_grad(), install_router(model, router, recorded):
        return model(input_ids=inputs).logits, recorded.calls


@pytest.mark.parametrize("fixture", ["tiny_olmoe_dir", "deepseek_dir"])
def test_offloaded_model_routes_and_records_as_the_whole_model(request, fixture, tmp_path):
    path = request.getfixturevalue(fixture)
    whole = ModelPlacement(device="cpu").load(path)
    spread = ModelPlacement(device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload")).load(path)
    assert set(spread.hf_device_map.values()) == {"cpu", "disk"}
    assert moe_shape(spread) == moe_shape(whole)
    gate = next(m for m in spread.modules() if hasattr(m, "_hf_hook") and type(m).__name__.endswith("Router"))
    assert gate is not None
    shape = moe_shape(whole)
    if fixture == "tiny_olmoe_dir":
        with torch.no_grad():
            scores = whole(input_ids=batch(seed=100, size=(8, 32)), output_router_logits=True).router_logits
        null = fit_kde_null([s.numpy() for s in scores], num_experts=shape.num_experts, grid_size=512)
    else:
        null = own_score_null(whole, shape.top_k)[0]
    inputs = batch(seed=2, size=(4, 16))
    # The model's top-k (experts untouched) and BH with variable k (the compacting experts kernel).
    for router in (TopKRouter(shape.num_experts, shape.top_k),
                   BHRouter(shape.num_experts, null, alpha=0.6, min_k=1,
                            max_k=shape.candidate_experts or shape.num_experts)):
        expected, expected_calls = routed(whole, router, inputs)
        logits, calls = routed(spread, router, inputs)
        assert len(calls) == len(expected_calls) == shape.num_layers
        torch.testing.assert_close(logits, expected, atol=0, rtol=0)
        for ours, theirs in zip(calls, expected_calls):
            assert ours[0] == theirs[0]
            for a, b in zip(ours[1:], theirs[1:]):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Left as it was: accelerate's hook calls the native router again.
    with torch.no_grad():
        torch.testing.assert_close(spread(input_ids=inputs).logits, whole(input_ids=inputs).logits, atol=0, rtol=0)


def test_memory_limits_without_a_device_map_are_refused():
    with pytest.raises(ValueError, match=r"max_memory: .* given without device_map"):
        ModelPlacement(max_memory={"cpu": "1GiB"})
