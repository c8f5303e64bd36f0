"""The transformers MoE families routelab can route, and where their routers and experts sit.

Each MoE block of a transformers v5 model has a router (a ``*TopKRouter``, named ``gate`` or
``router`` depending on the family) that returns ``(router_logits, top_k_weights, top_k_index)`` and
``experts`` that consume index and weights. A :class:`Family` records what differs between families:
where the router sits, which expert probabilities the native weights are taken from, whether they are
renormalised over the selected experts, and the dtype they are handed to the experts in. With it,
``TopKRouter(E, model_k)`` reproduces each supported family's native forward. Families whose native
selection is not a top-k over one per-token score, or whose weights are not a function of per-expert
probabilities, are refused with the reason (:data:`REFUSED_MODEL_TYPES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from routelab.routing.contract import softmax_float32


@dataclass(frozen=True)
class Family:
    """What routelab needs to know about one transformers MoE family to replace its selection.

    ``renormalize`` says whether the native top-k weights are renormalised over the selected
    experts: ``"config"`` (the router's ``norm_topk_prob``), ``"always"`` or ``"never"``.
    Softmax over the selected logits (gpt_oss, granitemoe) is the softmax probabilities
    renormalised over the selection, so it is ``"always"``. ``weights_dtype`` is the dtype the
    native weights reach the experts in: that of the router ``"logits"``, of the router's input
    (``"hidden"``) or ``"float32"``.
    """

    model_type: str
    router_attr: str = "gate"
    renormalize: str = "config"
    weights_dtype: str = "logits"
    expert_probs: Callable[[torch.Tensor], torch.Tensor] = softmax_float32
    logits_float32: bool = False  # the native router casts its logits to float32 (granitemoe)

    def router_logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """The native router's logits ``[tokens, experts]``, computed directly: every supported router
        is one linear layer, and skipping its own softmax and top-k saves work on every MoE layer."""
        flat = hidden_states.reshape(-1, router.weight.shape[-1])
        logits = F.linear(flat, router.weight, getattr(router, "bias", None))
        return logits.float() if self.logits_float32 else logits

    def norm_topk_prob(self, router: nn.Module) -> bool:
        if self.renormalize == "config":
            return bool(router.norm_topk_prob)
        return self.renormalize == "always"

    def weights_dtype_for(self, router_logits: torch.Tensor, hidden_states: torch.Tensor) -> torch.dtype:
        return {"logits": router_logits.dtype, "hidden": hidden_states.dtype, "float32": torch.float32}[
            self.weights_dtype]


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("olmoe"),
    Family("flex_olmo"),
    Family("qwen2_moe"),
    Family("qwen3_moe"),
    Family("qwen3_next"),
    Family("mixtral", renormalize="always", weights_dtype="float32"),
    Family("gpt_oss", router_attr="router", renormalize="always"),
    Family("granitemoe", router_attr="router", renormalize="always", weights_dtype="hidden", logits_float32=True),
    Family("granitemoeshared", router_attr="router", renormalize="always", weights_dtype="hidden", logits_float32=True),
    Family("granitemoe_swa", router_attr="router", renormalize="always", weights_dtype="hidden", logits_float32=True),
    Family("granitemoehybrid", router_attr="router", renormalize="always", weights_dtype="hidden", logits_float32=True),
    Family("mellum"),
    Family("minimax", renormalize="always", weights_dtype="float32"),
    Family("jamba", router_attr="router", renormalize="never", weights_dtype="hidden"),
    Family("qwen3_5_moe_text", renormalize="always"),
)}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

_GROUPED_SIGMOID = ("it selects by grouped top-k (n_group / topk_group) over sigmoid scores plus "
                    "e_score_correction_bias, not by top-k over one per-token score")
_SIGMOID = "its weights are sigmoid scores, not probabilities over the experts"
REFUSED_MODEL_TYPES: dict[str, str] = {
    **dict.fromkeys(("deepseek_v3", "glm4_moe", "dots1", "exaone_moe", "solar_open", "kimi_linear"),
                    _GROUPED_SIGMOID),
    "lfm2_moe": f"{_SIGMOID}, scaled by routed_scaling_factor, and it may select by scores plus an expert bias",
    "minimax_m2": f"{_SIGMOID}, and it selects by scores plus e_score_correction_bias",
    "deepseek_v2": ("its group-limited greedy top-k restricts the choice to the best expert groups, and its "
                    "weights are scaled by routed_scaling_factor"),
    "ernie4_5_moe": "it selects by top-k over bias-corrected probabilities (moe_statics), not the router's own scores",
    "phimoe": ("its sparsemixer always picks two experts and weights each by a softmax over a jitter-masked "
               "subset of logits that depends on the earlier pick, not by per-expert probabilities"),
}


class UnsupportedModelError(ValueError):
    """The model has no MoE routers routelab knows how to replace."""


@dataclass
class MoELayer:
    """One MoE block: its position among MoE blocks, its router (gate) and experts modules."""

    index: int
    name: str
    gate: nn.Module
    experts: nn.Module


def model_family(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``; raises :class:`UnsupportedModelError` naming the reason."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    reason = REFUSED_MODEL_TYPES.get(model_type, "routelab has not verified its router and experts contract")
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported: {reason}; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks in forward order; raises for a model whose routers are not supported."""
    family = model_family(model)
    layers = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, family.router_attr, None), getattr(module, "experts", None)
        if gate is None or experts is None or not type(gate).__name__.endswith("TopKRouter"):
            continue
        layers.append(MoELayer(len(layers), name, gate, experts))
    if not layers:
        raise UnsupportedModelError(
            f"model type {family.model_type!r}: no MoE block with a *TopKRouter "
            f"{family.router_attr!r} and 'experts' found; is this a dense variant?"
        )
    return layers


@dataclass(frozen=True)
class MoEShape:
    """What a route job needs to know of a model's MoE layers, read once: the number of MoE layers, the
    experts per layer, the model's own top-k, whether it renormalises the top-k weights, and the FLOPs
    of one token through one selected expert (2 per multiply-add of every expert weight)."""

    num_layers: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    expert_flops_per_selection: float


def moe_shape(model: nn.Module) -> MoEShape:
    """The :class:`MoEShape` of a supported model (the first MoE block's router and experts stand for all).

    FLOPs are read off the experts parameters (``[experts, ...]`` tensors), so they hold for any
    supported family's expert shape (gated or not, with or without biases).
    """
    family = model_family(model)
    layers = find_moe_layers(model)
    gate, experts = layers[0].gate, layers[0].experts
    num_experts = int(gate.num_experts)
    weights = sum(p.numel() for p in experts.parameters() if p.dim() >= 2 and p.shape[0] == num_experts)
    return MoEShape(num_layers=len(layers), num_experts=num_experts, top_k=int(gate.top_k),
                    norm_topk_prob=family.norm_topk_prob(gate), expert_flops_per_selection=2.0 * weights / num_experts)
