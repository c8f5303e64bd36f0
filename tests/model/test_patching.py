"""install_router on a real (tiny, random) OLMoE, for every experts kernel transformers offers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from routelab.model.families import UnsupportedModelError, moe_shape
from routelab.model.patching import install_router
from routelab.routing import BHRouter, TopKRouter
from tests.support.models import (
    KERNELS,
    SelectionCapture,
    assert_topk_reproduces_native,
    batch,
    load_tiny,
    own_null,
    routed_logits,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def kde_null(tiny_olmoe_dir):
    return own_null(load_tiny(tiny_olmoe_dir, "eager"), num_experts=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fixture", ["tiny_olmoe_dir", "tiny_olmoe_norm_dir"])
def test_topk_router_reproduces_native_logits(request, fixture, kernel, device):
    model = load_tiny(request.getfixturevalue(fixture), kernel).to(device)
    shape = moe_shape(model)
    num_experts, top_k, norm_topk_prob = shape.num_experts, shape.top_k, shape.norm_topk_prob
    assert (num_experts, top_k, norm_topk_prob) == (8, 2, fixture == "tiny_olmoe_norm_dir")
    assert_topk_reproduces_native(model, batch().to(device), num_experts, top_k, router_logits_atol=1e-6)


def test_router_logits_hooks_installed_while_patched(tiny_olmoe_dir):
    # First forward with output_router_logits happens inside the block: hooks match the subclass.
    model = load_tiny(tiny_olmoe_dir)
    with torch.no_grad(), install_router(model, TopKRouter(8, 2)):
        out = model(input_ids=batch(), output_router_logits=True)
    assert len(out.router_logits) == 2 and all(r.shape == (36, 8) for r in out.router_logits)


@pytest.mark.parametrize("device", DEVICES)
def test_variable_k_agrees_across_kernels(tiny_olmoe_dir, kde_null, device):
    inputs = batch(seed=1, size=(4, 16)).to(device)
    router = BHRouter(8, kde_null, alpha=0.2, min_k=1, max_k=8)
    capture = SelectionCapture()
    reference = routed_logits(load_tiny(tiny_olmoe_dir, "eager").to(device), router, inputs, capture)
    ks = torch.cat([s.k.cpu() for s in capture.selections.values()])
    # The test is only meaningful if sentinel slots (k < max_k) and several k values occur.
    assert (ks < 8).any() and len(ks.unique()) >= 3, ks.unique()
    assert torch.isfinite(reference).all()
    for kernel in ("grouped_mm", "batched_mm"):
        logits = routed_logits(load_tiny(tiny_olmoe_dir, kernel).to(device), router, inputs)
        assert not torch.isnan(logits).any(), kernel
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0, msg=kernel)


def reference_moe_output(experts, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """OLMoE experts written out in float64: sum over selected experts of w * down(silu(gate) * up)."""
    num_experts = experts.gate_up_proj.shape[0]
    gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()
    x = hidden.reshape(-1, hidden.shape[-1]).double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(indices[t].tolist(), weights[t].double()):
            if e == num_experts:
                continue
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += w * (down[e] @ (F.silu(gate) * up))
    return out


def moe_blocks(model, router, inputs, capture=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (input, output)}`` of every MoE block in one routed forward."""
    blocks = {}

    def keep(index):
        def hook(module, args, output):
            blocks[index] = (args[0].detach(), output.detach())
        return hook

    handles = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    try:
        routed_logits(model, router, inputs, capture)
    finally:
        for handle in handles:
            handle.remove()
    return blocks


@pytest.mark.parametrize("kernel", KERNELS)
def test_variable_k_moe_output_matches_written_out_experts(tiny_olmoe_dir, kde_null, kernel):
    model = load_tiny(tiny_olmoe_dir, kernel)
    capture = SelectionCapture()
    blocks = moe_blocks(model, BHRouter(8, kde_null, alpha=0.2, min_k=1, max_k=8), batch(seed=2), capture)
    for layer, (hidden, output) in blocks.items():
        selection = capture.selections[layer]
        assert (selection.indices == 8).any(), "sentinel slots must be exercised"
        expected = reference_moe_output(model.model.layers[layer].mlp.experts, hidden, selection.indices,
                                        selection.weights)
        torch.testing.assert_close(output.reshape(expected.shape).double(), expected, atol=1e-5, rtol=1e-4)


def router_state(model):
    """Per layer: the gate's class, the experts kernel, whether the gate has state."""
    return [(type(layer.mlp.gate), layer.mlp.experts.config._experts_implementation,
             hasattr(layer.mlp.gate, "_routelab_state")) for layer in model.model.layers]


def test_install_router_restores_model(tiny_olmoe_dir):
    model = load_tiny(tiny_olmoe_dir, "grouped_mm")
    before = router_state(model)
    native_class = type(model.model.layers[0].mlp.gate)
    with install_router(model, TopKRouter(8, 2)) as layers:
        assert [layer.index for layer in layers] == [0, 1]
        for gate_class, kernel, has_state in router_state(model):
            assert gate_class is not native_class and issubclass(gate_class, native_class) and has_state
            assert kernel == "grouped_mm"  # fixed k: no padded slots, the experts stay native
    assert router_state(model) == before
    with install_router(model, BHRouter(8, _uniform_null(), alpha=0.5, min_k=1, max_k=8)):
        # variable k: the compacting kernel around the model's own, through transformers' experts interface
        assert all(kernel == "routelab_compact_grouped_mm" for _, kernel, _ in router_state(model))
    assert router_state(model) == before
    assert before == [(native_class, "grouped_mm", False)] * 2


def test_install_router_restores_model_when_block_raises(tiny_olmoe_dir):
    model = load_tiny(tiny_olmoe_dir, "batched_mm")
    before = router_state(model)
    inputs = batch()
    with torch.no_grad():
        native = model(input_ids=inputs).logits
    with pytest.raises(RuntimeError, match="boom"):
        with install_router(model, BHRouter(8, _uniform_null(), alpha=0.5, min_k=1, max_k=8)):
            raise RuntimeError("boom")
    assert router_state(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=inputs).logits, native, atol=0, rtol=0)


def _uniform_null():
    from routelab.routing.nulls import TabulatedNull

    grid = np.linspace(-5, 5, 11, dtype=np.float32)[None]
    return TabulatedNull(grid=np.repeat(grid, 2, 0), sf=np.repeat(1 - (grid + 5) / 10, 2, 0),
                         num_experts=8, min_pvalue=1e-6)


def test_unsupported_model_raises_naming_type(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="llama") as info:
        with install_router(model, TopKRouter(8, 2)):
            pass
    assert "olmoe" in str(info.value)


def test_nested_install_router_refuses_or_keeps_the_outer_router(tiny_olmoe_dir):
    model = load_tiny(tiny_olmoe_dir)
    native = router_state(model)
    inputs = batch()
    with torch.no_grad(), install_router(model, TopKRouter(8, 2)):
        outer = model(input_ids=inputs).logits
        inner = install_router(model, TopKRouter(8, 1))
        try:
            inner.__enter__()
        except (ValueError, RuntimeError):  # refusing to nest, with a clear error, is also acceptable
            return
        inner.__exit__(None, None, None)
        torch.testing.assert_close(model(input_ids=inputs).logits, outer, atol=0, rtol=0)
    assert router_state(model) == native


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("router", ["topk", "bh fixed k", "bh variable k"])
def test_nan_router_logits_raise_naming_the_layer(tiny_olmoe_dir, router, device):
    # On CPU the layer raises; on an accelerator the check is deferred to the end of the forward (one
    # host sync) and names the same layer.
    model = load_tiny(tiny_olmoe_dir, "grouped_mm").to(device)
    routers = {"topk": TopKRouter(8, 2), "bh fixed k": BHRouter(8, _uniform_null(), alpha=0.5, min_k=2, max_k=2),
               "bh variable k": BHRouter(8, _uniform_null(), alpha=0.5, min_k=1, max_k=8)}
    layers = install_router(model, routers[router])
    with torch.no_grad(), layers as moe_layers:
        moe_layers[1].gate.weight[3, 0] = float("nan")
        with pytest.raises(ValueError, match=rf"layer 1: {batch().numel()} of {batch().numel()} tokens have NaN"):
            model(input_ids=batch().to(device))


def test_deferred_nonfinite_check_names_the_first_bad_layer_and_resets():
    from routelab.model.patching import _NonFiniteCheck

    check = _NonFiniteCheck()
    good, bad = torch.zeros(5, 4), torch.zeros(5, 4)
    bad[1, 2], bad[4, 0] = float("inf"), float("nan")
    for layer, logits in enumerate([good, bad, bad]):
        check.add(layer, logits)
    with pytest.raises(ValueError, match="layer 1: 2 of 5 tokens have NaN or infinite"):
        check.check()
    check.check()  # the failed forward's counts are gone
    check.add(0, good)
    check.check()


@pytest.mark.parametrize("kernel", KERNELS)
def test_skip_top_moe_output_is_native_top_k_without_its_best_expert(tiny_olmoe_dir, kernel):
    """The drop-top-1 ablation, checked against the native gate's own top-k with its first expert removed
    and the experts written out by hand."""
    model = load_tiny(tiny_olmoe_dir, kernel)
    blocks = moe_blocks(model, TopKRouter(8, k=2, skip_top=1), batch(seed=3))
    for layer, (hidden, output) in blocks.items():
        mlp = model.model.layers[layer].mlp
        flat = hidden.reshape(-1, hidden.shape[-1])
        probs = torch.softmax(F.linear(flat, mlp.gate.weight).float(), dim=-1)
        native_weights, native_index = torch.topk(probs, 2, dim=-1)  # the tiny model's own top-2
        expected = reference_moe_output(mlp.experts, hidden, native_index[:, 1:], native_weights[:, 1:])
        torch.testing.assert_close(output.reshape(expected.shape).double(), expected, atol=1e-5, rtol=1e-4)
