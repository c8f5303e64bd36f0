"""install_router on tiny random models of every supported transformers MoE family, every experts kernel.

Each family is saved with ``save_pretrained`` and loaded back through ``AutoModelForCausalLM`` as the
pipeline does. ``TopKRouter(E, model_k)`` must reproduce the native forward, which checks the
family's weight facts (softmax probabilities, renormalised or not) against transformers' own code.
"""

from __future__ import annotations

import pytest
import torch

from routelab.model.families import SUPPORTED_MODEL_TYPES, UnsupportedModelError, moe_shape
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
    seed_everything,
)

NUM_EXPERTS, TOP_K = 8, 2

COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, eos_token_id=0, bos_token_id=None,
    tie_word_embeddings=False, num_experts_per_tok=TOP_K,
    # Larger-than-default router init spreads the router probabilities so top-k ties are (almost surely) absent.
    initializer_range=0.2,
)
LINEAR_ATTENTION = dict(head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                        linear_num_value_heads=2, layer_types=["linear_attention", "full_attention"])

# model type -> (config overrides, whether the native top-k weights are renormalised over the selection)
FAMILIES = {
    "olmoe": (dict(num_experts=NUM_EXPERTS, norm_topk_prob=False), False),
    "flex_olmo": (dict(num_experts=NUM_EXPERTS, norm_topk_prob=True), True),
    "mellum": (dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, head_dim=16, norm_topk_prob=False), False),
    "qwen2_moe": (dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                       norm_topk_prob=True), True),
    "qwen3_moe": (dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, head_dim=16, norm_topk_prob=False), False),
    "qwen3_next": (dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                        norm_topk_prob=True, **LINEAR_ATTENTION), True),
    "qwen3_5_moe_text": (dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                              **LINEAR_ATTENTION), True),
    "mixtral": (dict(num_local_experts=NUM_EXPERTS), True),
    "minimax": (dict(num_local_experts=NUM_EXPERTS, head_dim=16, block_size=4,
                     layer_types=["linear_attention", "full_attention"]), True),
    "gpt_oss": (dict(num_local_experts=NUM_EXPERTS, head_dim=16, sliding_window=8,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), True),
    "granitemoe": (dict(num_local_experts=NUM_EXPERTS), True),
    "granitemoeshared": (dict(num_local_experts=NUM_EXPERTS, shared_intermediate_size=16), True),
    "granitemoe_swa": (dict(num_local_experts=NUM_EXPERTS), True),
    "granitemoehybrid": (dict(num_local_experts=NUM_EXPERTS, shared_intermediate_size=16,
                              layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                              mamba_n_groups=1, mamba_chunk_size=16), True),
    "jamba": (dict(num_experts=NUM_EXPERTS, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2,
                   attn_layer_offset=1, use_mamba_kernels=False, mamba_d_state=8), False),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: a second intra-op thread only adds contention (2-core CI boxes ran 3x slower with it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **overrides})


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Tiny random checkpoints, one per family, written on first use."""
    from transformers import AutoModelForCausalLM

    paths = {}

    def path(model_type: str) -> str:
        if model_type not in paths:
            seed_everything(0)
            model = AutoModelForCausalLM.from_config(tiny_config(model_type, **FAMILIES[model_type][0]))
            paths[model_type] = str(tmp_path_factory.mktemp(model_type))
            model.save_pretrained(paths[model_type])
        return paths[model_type]

    return path


def test_every_supported_family_is_tested():
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_topk_router_reproduces_native_logits(family_dirs, family, kernel):
    model = load_tiny(family_dirs(family), kernel)
    shape = moe_shape(model)
    assert (shape.num_layers, shape.num_experts, shape.top_k, shape.norm_topk_prob) == (2, NUM_EXPERTS, TOP_K,
                                                                                      FAMILIES[family][1])
    # Later layers see inputs that differ by float rounding where native weights are computed differently.
    assert_topk_reproduces_native(model, batch(), NUM_EXPERTS, TOP_K, router_logits_atol=1e-5)


def experts_weights_dtypes(model, inputs):
    """Forward ``inputs``; return the model logits and the dtype of the weights each experts module received."""
    dtypes = []

    def keep(module, args):
        dtypes.append(args[2].dtype)  # experts(hidden_states, top_k_index, top_k_weights) in every family

    experts = [module for name, module in model.named_modules() if name.endswith(".experts")]
    handles = [module.register_forward_pre_hook(keep) for module in experts]
    try:
        with torch.no_grad():
            return model(input_ids=inputs).logits, dtypes
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_router_reproduces_native_bfloat16_forward(family_dirs, family):
    # Families hand the experts their weights in different dtypes (float32, the router's, the input's);
    # in bfloat16 a different dtype changes the output, so the patched router must match it.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dirs(family), dtype=torch.bfloat16).eval()
    inputs = batch()
    native, native_dtypes = experts_weights_dtypes(model, inputs)
    with install_router(model, TopKRouter(NUM_EXPERTS, TOP_K)):
        patched, patched_dtypes = experts_weights_dtypes(model, inputs)
    assert patched_dtypes == native_dtypes and len(native_dtypes) == 2
    torch.testing.assert_close(patched, native, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_variable_k_agrees_across_kernels(family_dirs, family):
    path = family_dirs(family)
    eager = load_tiny(path, "eager")
    router = BHRouter(NUM_EXPERTS, own_null(eager, NUM_EXPERTS), alpha=0.3, min_k=1, max_k=NUM_EXPERTS)
    inputs = batch(seed=1, size=(4, 16))
    capture = SelectionCapture()
    reference = routed_logits(eager, router, inputs, capture)
    ks = torch.cat([selection.k for selection in capture.selections.values()])
    # Only meaningful if padded slots (k < max_k) and more than one k occur.
    assert (ks < NUM_EXPERTS).any() and len(ks.unique()) >= 2, ks.unique()
    assert not torch.isnan(reference).any()
    for kernel in ("grouped_mm", "batched_mm"):
        logits = routed_logits(load_tiny(path, kernel), router, inputs)
        assert not torch.isnan(logits).any(), kernel
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0, msg=kernel)


@pytest.mark.parametrize("family", FAMILIES)
def test_bh_router_with_fixed_k_matches_topk(family_dirs, family):
    model = load_tiny(family_dirs(family), "eager")
    bh = BHRouter(NUM_EXPERTS, own_null(model, NUM_EXPERTS), alpha=0.3, min_k=TOP_K, max_k=TOP_K)
    inputs = batch(seed=3)
    torch.testing.assert_close(routed_logits(model, bh, inputs),
                               routed_logits(model, TopKRouter(NUM_EXPERTS, TOP_K), inputs), atol=1e-6, rtol=0)


UNSUPPORTED = {
    "deepseek_v3": (dict(n_routed_experts=NUM_EXPERTS, n_group=2, topk_group=1, first_k_dense_replace=0,
                         moe_intermediate_size=16, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, rope_interleave=False), "grouped top-k"),
    "phimoe": (dict(num_local_experts=NUM_EXPERTS), "sparsemixer"),
    "lfm2_moe": (dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, num_dense_layers=0,
                      layer_types=["full_attention", "full_attention"]), "sigmoid"),
}


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_family_raises_naming_type_and_reason(family):
    from transformers import AutoModelForCausalLM

    overrides, reason = UNSUPPORTED[family]
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with pytest.raises(UnsupportedModelError, match=family) as info:
        with install_router(model, TopKRouter(NUM_EXPERTS, TOP_K)):
            pass
    message = str(info.value)
    assert reason in message
    assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES)
    with pytest.raises(UnsupportedModelError, match=family):
        moe_shape(model)
