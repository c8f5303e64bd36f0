"""Tiny random configs of every supported transformers MoE family (and its config variants), shared by
the families' exactness tests and ``benchmarks/routing_overhead.py --family``."""

from __future__ import annotations

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

MLA = dict(kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
# DeepSeek-V3's router in a tiny shape: two groups of four experts, the best one kept (4 candidates).
GROUPED = dict(n_routed_experts=NUM_EXPERTS, n_group=2, topk_group=1, first_k_dense_replace=0, moe_intermediate_size=16)

# case -> (model type, config overrides, whether the native top-k weights are renormalised over the selection)
CASES = {
    "olmoe": ("olmoe", dict(num_experts=NUM_EXPERTS, norm_topk_prob=False), False),
    "flex_olmo": ("flex_olmo", dict(num_experts=NUM_EXPERTS, norm_topk_prob=True), True),
    "mellum": ("mellum", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, head_dim=16, norm_topk_prob=False),
               False),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=16, norm_topk_prob=True), True),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, head_dim=16,
                                    norm_topk_prob=False), False),
    "qwen3_next": ("qwen3_next", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, norm_topk_prob=True, **LINEAR_ATTENTION),
                   True),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16,
                                                  shared_expert_intermediate_size=16, **LINEAR_ATTENTION), True),
    "mixtral": ("mixtral", dict(num_local_experts=NUM_EXPERTS), True),
    "minimax": ("minimax", dict(num_local_experts=NUM_EXPERTS, head_dim=16, block_size=4,
                                layer_types=["linear_attention", "full_attention"]), True),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=NUM_EXPERTS, head_dim=16, sliding_window=8,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), True),
    "granitemoe": ("granitemoe", dict(num_local_experts=NUM_EXPERTS), True),
    "granitemoeshared": ("granitemoeshared", dict(num_local_experts=NUM_EXPERTS, shared_intermediate_size=16), True),
    "granitemoe_swa": ("granitemoe_swa", dict(num_local_experts=NUM_EXPERTS), True),
    "granitemoehybrid": ("granitemoehybrid", dict(num_local_experts=NUM_EXPERTS, shared_intermediate_size=16,
                                                  layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                                                  mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16), True),
    "jamba": ("jamba", dict(num_experts=NUM_EXPERTS, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2,
                            attn_layer_offset=1, use_mamba_kernels=False, mamba_d_state=8), False),
    "aria_text": ("aria_text", dict(moe_num_experts=NUM_EXPERTS, moe_topk=TOP_K, moe_intermediate_size=16), True),
    "lara_mini": ("lara_mini", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=16), True),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", dict(num_experts=NUM_EXPERTS, moe_topk=TOP_K, head_dim=16), True),
    "cohere2_moe": ("cohere2_moe", dict(num_experts=NUM_EXPERTS, num_shared_experts=1), True),
    "cohere2_moe_sigmoid": ("cohere2_moe", dict(num_experts=NUM_EXPERTS, expert_selection_fn="sigmoid",
                                                norm_topk_prob=False), False),
    "ernie4_5_moe": ("ernie4_5_moe", dict(moe_num_experts=NUM_EXPERTS, moe_k=TOP_K, moe_intermediate_size=16,
                                          moe_layer_start_index=0, moe_num_shared_experts=1), True),
    "deepseek_v2": ("deepseek_v2", dict(n_routed_experts=NUM_EXPERTS, first_k_dense_replace=0, moe_intermediate_size=16,
                                        q_lora_rank=None, routed_scaling_factor=1.5, **MLA), False),
    "deepseek_v2_grouped": ("deepseek_v2", dict(n_routed_experts=NUM_EXPERTS, first_k_dense_replace=0,
                                                moe_intermediate_size=16, q_lora_rank=None, routed_scaling_factor=1.5,
                                                topk_method="group_limited_greedy", n_group=2, topk_group=1, **MLA),
                            False),
    "deepseek_v3": ("deepseek_v3", dict(**GROUPED, q_lora_rank=None, rope_interleave=False, routed_scaling_factor=2.5,
                                        **MLA), True),
    "deepseek_v32": ("deepseek_v32", dict(**GROUPED, q_lora_rank=16, rope_interleave=False, index_topk=8,
                                          index_n_heads=2, index_head_dim=16, **MLA), True),
    "glm4_moe": ("glm4_moe", dict(**GROUPED, head_dim=16, routed_scaling_factor=1.8), True),
    "glm4_moe_lite": ("glm4_moe_lite", dict(**GROUPED, q_lora_rank=None, rope_interleave=False,
                                            mlp_layer_types=["sparse", "sparse"], **MLA), True),
    "dots1": ("dots1", dict(**GROUPED, n_shared_experts=1, head_dim=16), False),
    "exaone_moe": ("exaone_moe", dict(num_experts=NUM_EXPERTS, n_group=2, topk_group=1, first_k_dense_replace=0,
                                      moe_intermediate_size=16, head_dim=16), True),
    "solar_open": ("solar_open", dict(**GROUPED, head_dim=16), True),
    "sarvam_moe": ("sarvam_moe", dict(**GROUPED, head_dim=16), True),
    "minimax_m2": ("minimax_m2", dict(num_local_experts=NUM_EXPERTS, head_dim=16), True),
    "lfm2_moe": ("lfm2_moe", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, num_dense_layers=0,
                                  routed_scaling_factor=1.5, layer_types=["full_attention", "full_attention"]), True),
    "lfm2_moe_unbiased": ("lfm2_moe", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, num_dense_layers=0,
                                           use_expert_bias=False, layer_types=["full_attention", "full_attention"]),
                          True),
    "afmoe": ("afmoe", dict(num_experts=NUM_EXPERTS, moe_intermediate_size=16, num_dense_layers=0, head_dim=16,
                            num_shared_experts=1, route_scale=2.0), True),
    "qwen3_vl_moe": ("qwen3_vl_moe", dict(
        text_config=dict(COMMON, num_experts=NUM_EXPERTS, moe_intermediate_size=16, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0])), True),
    "llama4_text": ("llama4_text", dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=1, intermediate_size_mlp=16,
                                        head_dim=16, interleave_moe_layer_step=1, moe_layers=[0, 1]), False),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if "text_config" in overrides:  # a vision-language model: the tiny text model sits in its text config
        return AutoConfig.for_model(model_type, **overrides)
    return AutoConfig.for_model(model_type, **{**COMMON, **overrides})
