"""install_router on tiny random models of every supported transformers MoE family, every experts kernel.

Each family is saved with ``save_pretrained`` and loaded back through the pipeline's loader class
(``AutoModelForCausalLM``; Qwen3-VL-MoE's image-text-to-text class). ``TopKRouter(E, model_k)`` must
reproduce the native forward, which checks the family's facts (what is ranked, the selection bias and
expert groups, what mixes the experts, renormalised or scaled, in which dtype) against transformers' code.
"""

from __future__ import annotations

import pytest
import torch

from routelab.model.families import SUPPORTED_MODEL_TYPES, UnsupportedModelError, moe_shape
from routelab.model.loading import model_loader
from routelab.model.patching import install_router
from routelab.routing import BHRouter, TopKRouter, build_router
from routelab.routing.nulls import fit_kde_null
from tests.support.families import CASES, NUM_EXPERTS, TOP_K, tiny_config
from tests.support.models import (
    KERNELS,
    SelectionCapture,
    assert_topk_reproduces_native,
    batch,
    load_tiny,
    routed_logits,
    seed_everything,
)

GROUPED_CASES = ("deepseek_v2_grouped", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "dots1",
                 "exaone_moe", "solar_open", "sarvam_moe")
# Families whose experts compute every expert, outside transformers' experts implementations.
NO_KERNELS = ("llama4_text",)


def top_k(case: str) -> int:
    return CASES[case][1].get("num_experts_per_tok", TOP_K)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: a second intra-op thread only adds contention (2-core CI boxes ran 3x slower with it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Tiny random checkpoints, one per case, written on first use. Selection biases (zero when a model is
    made) get random values, so what is ranked differs from what mixes the experts."""

    paths = {}

    def path(case: str) -> str:
        if case not in paths:
            model_type, overrides, _ = CASES[case]
            seed_everything(0)
            config = tiny_config(model_type, **overrides)
            model = model_loader(config).from_config(config)
            with torch.no_grad():
                for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                    if name.endswith(("e_score_correction_bias", "expert_bias")):
                        tensor.copy_(torch.randn_like(tensor) * 0.3)
            paths[case] = str(tmp_path_factory.mktemp(case))
            model.save_pretrained(paths[case])
        return paths[case]

    return path


def load_case(family_dirs, case: str, kernel: str = "eager"):
    return load_tiny(family_dirs(case), None if case in NO_KERNELS else kernel)


def test_every_supported_family_is_tested():
    assert set(SUPPORTED_MODEL_TYPES) == {model_type for model_type, _, _ in CASES.values()}


KERNEL_CASES = [(case, kernel) for case in CASES for kernel in KERNELS if kernel == "eager" or case not in NO_KERNELS]


@pytest.mark.parametrize(("family", "kernel"), KERNEL_CASES)
def test_topk_router_reproduces_native_logits(family_dirs, family, kernel):
    model = load_case(family_dirs, family, kernel)
    shape = moe_shape(model)
    assert (shape.num_layers, shape.num_experts, shape.top_k, shape.norm_topk_prob) == (2, NUM_EXPERTS, top_k(family),
                                                                                      CASES[family][2])
    assert (shape.candidate_experts == 4) == (family in GROUPED_CASES)
    # Later layers see inputs that differ by float rounding where native weights are computed differently.
    assert_topk_reproduces_native(model, batch(), NUM_EXPERTS, top_k(family), router_logits_atol=1e-5)


def experts_weights_dtypes(model, inputs):
    """Forward ``inputs``; return the model logits and the dtype of the weights each experts module received."""
    dtypes = []

    def keep(module, args):
        if len(args) > 2:  # experts(hidden_states, top_k_index, top_k_weights); Llama 4's take scaled inputs
            dtypes.append(args[2].dtype)

    experts = [module for name, module in model.named_modules() if name.endswith(".experts")]
    handles = [module.register_forward_pre_hook(keep) for module in experts]
    try:
        with torch.no_grad():
            return model(input_ids=inputs).logits, dtypes
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", CASES)
def test_topk_router_reproduces_native_bfloat16_forward(family_dirs, family):
    # Families hand the experts their weights in different dtypes (float32, the router's, the input's);
    # in bfloat16 a different dtype changes the output, so the patched router must match it.


    model = load_tiny(family_dirs(family), None, dtype=torch.bfloat16)
    inputs = batch()
    native, native_dtypes = experts_weights_dtypes(model, inputs)
    with install_router(model, TopKRouter(NUM_EXPERTS, top_k(family))):
        patched, patched_dtypes = experts_weights_dtypes(model, inputs)
    if family not in NO_KERNELS:  # Llama 4's experts take the scaled inputs, not index and weights
        assert patched_dtypes == native_dtypes and len(native_dtypes) == 2
    torch.testing.assert_close(patched, native, atol=0, rtol=0)


class ScoreCapture:
    """A recorder keeping each layer's selection scores (the router logits where they are the scores)."""

    def __init__(self):
        self.scores, self.selections = {}, {}

    def record(self, layer, router_logits, selection):
        self.scores.setdefault(layer, []).append(router_logits if selection.scores is None else selection.scores)
        self.selections[layer] = selection


def own_score_null(model, k: int):
    """A kde null fitted on the model's own selection scores (independent inputs): what calibrate_null fits."""
    capture = ScoreCapture()
    routed_logits(model, TopKRouter(NUM_EXPERTS, k), batch(seed=100, size=(8, 32)), capture)
    layers = [torch.cat(capture.scores[layer]).float().numpy() for layer in sorted(capture.scores)]
    return fit_kde_null(layers, num_experts=NUM_EXPERTS, grid_size=512), layers


def native_logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs).logits


@pytest.mark.parametrize("family", [case for case in CASES if case not in NO_KERNELS])
def test_variable_k_agrees_across_kernels(family_dirs, family):
    eager = load_case(family_dirs, family)
    candidates = moe_shape(eager).candidate_experts or NUM_EXPERTS
    null = own_score_null(eager, top_k(family))[0]
    inputs = batch(seed=1, size=(4, 16))
    for alpha in (0.3, 0.6, 0.9):  # the first level at which the tiny model's k varies
        router = BHRouter(NUM_EXPERTS, null, alpha=alpha, min_k=1, max_k=candidates)
        capture = SelectionCapture()
        reference = routed_logits(eager, router, inputs, capture)
        ks = torch.cat([selection.k for selection in capture.selections.values()])
        if len(ks.unique()) >= 2:
            break
    # Only meaningful if padded slots (k < max_k) and more than one k occur.
    assert (ks < candidates).any() and len(ks.unique()) >= 2, ks.unique()
    assert not torch.isnan(reference).any()
    for kernel in ("grouped_mm", "batched_mm"):
        logits = routed_logits(load_tiny(family_dirs(family), kernel), router, inputs)
        assert not torch.isnan(logits).any(), kernel
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0, msg=kernel)


# Every rule that takes min_k / max_k, at min_k = max_k = the model's k: whatever it counts, the clamp
# leaves the model's own top-k (p-value rules' nulls are fitted on the family's selection scores).
FIXED_K_RULES = {"bh": {"alpha": 0.3}, "hc": {}, "topp": {"p": 0.5}, "minp": {"m": 0.5}, "ratio": {"beta": 0.5},
                 "seqtopk": {"budget": 1.0}}


@pytest.mark.parametrize("family", CASES)
def test_every_rule_at_min_k_equal_max_k_equal_k_is_native_topk(family_dirs, family):
    model = load_case(family_dirs, family)
    k = top_k(family)
    null, _ = own_score_null(model, k)
    inputs = batch(seed=3)
    native = native_logits(model, inputs)
    for method, params in FIXED_K_RULES.items():
        router = build_router({"method": method, **params, "min_k": k, "max_k": k}, NUM_EXPERTS, k, null=null)
        torch.testing.assert_close(routed_logits(model, router, inputs), native, atol=1e-5, rtol=0, msg=method)


@pytest.mark.parametrize("family", GROUPED_CASES)
def test_group_limited_rules_choose_only_within_the_best_groups(family_dirs, family):
    # The native rule (DeepSeek-V3: sigmoid + bias, groups ranked by their two best scores; DeepSeek-V2:
    # softmax, by their best), written out here: every rule's experts lie in the token's kept group.
    model = load_case(family_dirs, family)
    null, _ = own_score_null(model, TOP_K)
    capture = ScoreCapture()
    router = BHRouter(NUM_EXPERTS, null, alpha=0.9, min_k=1, max_k=4)
    routed_logits(model, router, batch(seed=4, size=(4, 16)), capture)
    for layer, selection in capture.selections.items():
        scores = capture.scores[layer][-1].float()
        groups = scores.view(-1, 2, 4)
        if family == "deepseek_v2_grouped":
            best_group = groups.max(dim=-1).values.argmax(dim=-1)
        else:
            best_group = groups.topk(2, dim=-1).values.sum(dim=-1).argmax(dim=-1)
        used = selection.indices < NUM_EXPERTS
        assert used.sum() > selection.k.numel()  # several experts per token somewhere
        assert ((selection.indices // 4 == best_group.unsqueeze(-1)) | ~used).all()
        probs = selection.probs.view(-1, 2, 4)
        torch.testing.assert_close(probs.sum(dim=(1, 2)), torch.ones(len(probs)))  # renormalised over candidates
        assert (probs.gather(1, (1 - best_group).view(-1, 1, 1).expand(-1, 1, 4)) == 0).all()


@pytest.mark.parametrize("family", ["deepseek_v3", "lfm2_moe", "ernie4_5_moe"])
def test_p_value_rules_rank_the_biased_selection_scores(family_dirs, family):
    # The null is fitted on the score the family ranks by (sigmoid + bias; softmax + bias for ERNIE), so
    # the p-value order is the selection order and the recorded scores are the biased ones.
    model = load_case(family_dirs, family)
    null, _ = own_score_null(model, TOP_K)
    capture = ScoreCapture()
    routed_logits(model, BHRouter(NUM_EXPERTS, null, alpha=0.3, min_k=TOP_K, max_k=TOP_K), batch(seed=5), capture)
    selection = capture.selections[0]
    assert selection.scores is not None and selection.top_expert is None  # the bias reorders: no probability order
    assert (selection.pvalues.argmin(dim=-1) == selection.indices[:, 0]).float().mean() > 0.95  # p ties aside
    hooks, raw = [], []
    router = next(m for m in model.modules() if type(m).__name__.endswith(("TopkRouter", "TopKRouter")))
    bias = router.e_score_correction_bias if hasattr(router, "e_score_correction_bias") else None
    if bias is None and hasattr(router, "moe_statics"):
        bias = router.moe_statics.e_score_correction_bias.squeeze()
    if bias is None:
        bias = next(b for n, b in model.named_buffers() if n.endswith("expert_bias"))
    assert bias.abs().max() > 0.05  # the test checkpoint's bias is not zero

    def keep(module, args, output):
        raw.append(output[0])

    hooks.append(router.register_forward_hook(keep))
    try:
        native_logits(model, batch(seed=5))
    finally:
        hooks[0].remove()
    logits = raw[0].float()
    base = torch.softmax(logits, -1) if family == "ernie4_5_moe" else torch.sigmoid(logits)
    torch.testing.assert_close(capture.scores[0][-1].float(), base + bias, atol=1e-6, rtol=0)
    assert (capture.selections[0].indices[:, 0] != base.argmax(-1)).any()  # the bias changes some choices


def test_max_k_beyond_the_candidate_groups_is_refused(family_dirs):
    from routelab.routing import RouterConfigError

    model = load_case(family_dirs, "deepseek_v3")
    with pytest.raises(RouterConfigError, match=r"max_k: 5 exceeds the 4 experts .*best 1 of 2 expert groups"):
        with install_router(model, BHRouter(NUM_EXPERTS, own_score_null(model, TOP_K)[0], alpha=0.1, min_k=1,
                                           max_k=5)):
            pass


UNSUPPORTED = {
    "phimoe": (dict(num_local_experts=NUM_EXPERTS), "sparsemixer"),
    "longcat_flash": (dict(n_routed_experts=NUM_EXPERTS, zero_expert_num=2, moe_topk=TOP_K, expert_ffn_hidden_size=16,
                           q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                           num_layers=1), "zero-computation experts"),
    "jetmoe": (dict(num_local_experts=NUM_EXPERTS, kv_channels=8), "dispatch plan"),
    "dbrx": (dict(d_model=32, n_heads=2, n_layers=2, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
                  ffn_config={"moe_num_experts": NUM_EXPERTS, "moe_top_k": TOP_K, "ffn_hidden_size": 16}),
             "route_tokens_to_experts"),
}
# Supported families with a config value routelab does not implement: refused, never ignored.
UNIMPLEMENTED = {
    "deepseek_v3_softmax_scoring": ("deepseek_v3", dict(**CASES["deepseek_v3"][1], scoring_func="softmax"),
                                    "config field scoring_func = 'softmax' is not implemented"),
    "glm4_moe_other_topk_method": ("glm4_moe", dict(**CASES["glm4_moe"][1], topk_method="greedy"),
                                   "config field topk_method = 'greedy' is not implemented"),
}


@pytest.mark.parametrize("case", UNIMPLEMENTED)
def test_config_values_routelab_does_not_implement_are_refused(case):
    from transformers import AutoModelForCausalLM

    model_type, overrides, message = UNIMPLEMENTED[case]
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with pytest.raises(UnsupportedModelError, match=message):
        moe_shape(model)


def test_cohere2_expert_selection_fn_picks_the_variant():
    from routelab.model.families import model_family

    model = type("Model", (), {"config": tiny_config("cohere2_moe", expert_selection_fn="sigmoid")})()
    assert model_family(model).score == "sigmoid"
    model.config.expert_selection_fn = "relu"
    with pytest.raises(UnsupportedModelError, match="expert_selection_fn = 'relu' is not implemented; routelab "
                                                    "implements 'softmax', 'sigmoid'"):
        model_family(model)


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_family_raises_naming_type_and_reason(family):
    from transformers import AutoModelForCausalLM

    overrides, reason = UNSUPPORTED[family]
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    assert model.config.model_type == family
    with pytest.raises(UnsupportedModelError, match=family) as info:
        with install_router(model, TopKRouter(NUM_EXPERTS, TOP_K)):
            pass
    message = str(info.value)
    assert reason in message
    assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES)
    with pytest.raises(UnsupportedModelError, match=family):
        moe_shape(model)


def test_the_docs_families_table_lists_every_family_with_its_router():
    from routelab.model.families import FAMILIES, REFUSED_MODEL_TYPES
    from tests.support import REPO

    text = (REPO / "docs" / "models.md").read_text()
    supported = text.split("## Supported families")[1].split("\n## ")[0]
    rows = {}
    for line in supported.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| `"):
            rows.update({name.strip("` "): cells[1] for name in cells[0].split(",")})
    assert sorted(rows) == sorted(FAMILIES)
    assert {name: FAMILIES[name].router_kind for name in rows} == rows
    refused = text.split("## Refused families")[1].split("\n## ")[0]
    assert {line.split("|")[1].strip(" `") for line in refused.splitlines() if line.startswith("| `")} == set(
        REFUSED_MODEL_TYPES)
