"""The transformers MoE families routelab can route, and where their routers and experts sit.

Each MoE block of a transformers v5 model has a router (``gate`` or ``router``) that returns
``(router_logits, top_k_weights, top_k_index)`` and ``experts`` that consume index and weights. A
:class:`Family` records, as data, what differs between families: where the router and its linear layer
sit and in which dtype the logits are computed; what is ranked (softmax: the logits; sigmoid: the
sigmoid scores, plus a selection bias where the family has one); whether the choice is first limited
to the best expert groups; what mixes the selected experts (the probabilities or the sigmoid scores),
whether those are renormalised, with which epsilon, and scaled by which factor; and the dtype the
experts receive them in. With it, ``TopKRouter(E, model_k)`` reproduces each supported family's
native forward (:mod:`routelab.model.scores` computes the scores). A config field that changes a
router is read; a value routelab does not implement is refused (:data:`REFUSED_MODEL_TYPES` holds the
families that cannot fit, each with its reason).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from routelab.model.scores import LayerScores, group_candidates, sigmoid_scores, softmax_scores
from routelab.routing.contract import Mixing


@dataclass(frozen=True)
class Family:
    """What routelab needs to know about one transformers MoE family to replace its selection.

    ``router_classes``: class-name endings of the router module (``*TopKRouter`` in most families).
    ``linear``: the router's linear layer, an attribute of the router ("": the router's own weight).
    ``logits_dtype``: ``input`` (the linear in the input's dtype), ``float32`` (input and weight cast to
    float32 first), ``float32_after`` (the logits cast afterwards) or ``weight`` (the input cast to the
    weight's dtype). ``score``: ``softmax`` or ``sigmoid``; ``rank_logits``: a sigmoid router without a
    bias that takes the top-k of the logits. ``bias``: where the selection bias is: ``router``
    (``e_score_correction_bias``), ``argument`` (the block passes it to the router) or ``statics``
    (ERNIE's ``moe_statics``). ``groups``: group-limited selection by ``top2_sum`` or ``max`` group score
    (the router's ``num_group`` / ``topk_group``). ``renormalize``: ``config`` (the router's
    ``norm_topk_prob``), ``always`` or ``never``; ``norm_eps`` / ``norm_floor`` (a router attribute) and
    ``scale`` (a router attribute) make the :class:`~routelab.routing.contract.Mixing`.
    ``mixing_float32``: sigmoid scores are computed on float32 logits (else in the logits' dtype).
    ``weights_dtype``: the dtype the experts get the weights in: that of the router ``logits``, of the
    router's input (``hidden``), ``float32`` or of the mixing scores (``mixing``). ``output``: ``topk``
    (``logits, weights, index``) or ``dense`` (Llama 4: ``[tokens, experts]`` scores, then the logits).
    ``kernels``: the experts dispatch through transformers' experts implementations (else they compute
    every expert, so any selection works without the compacting kernel). ``variant``: a config field
    whose value picks one of ``variants`` (overrides of these fields); any other value is refused.
    ``config_values``: config fields and the values routelab implements (None: the field is absent).
    """

    model_type: str
    router_attr: str = "gate"
    router_classes: tuple[str, ...] = ("TopKRouter",)
    linear: str = ""
    logits_dtype: str = "input"
    score: str = "softmax"
    rank_logits: bool = False
    bias: str | None = None
    groups: str | None = None
    renormalize: str = "config"
    norm_eps: float = 0.0
    norm_floor: str | None = None
    scale: str | None = None
    mixing_float32: bool = True
    weights_dtype: str = "logits"
    output: str = "topk"
    kernels: bool = True
    variant: str | None = None
    variants: tuple[tuple[str, dict[str, Any]], ...] = ()
    config_values: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def router_kind(self) -> str:
        """The router in words, for the docs' families table."""
        ranked = {"softmax": "softmax", "sigmoid": "sigmoid"}[self.score]
        parts = [f"{ranked} top-k"]
        if self.bias:
            parts.append("selection bias")
        if self.groups:
            parts.append(f"group-limited ({self.groups.replace('_', ' ')})")
        if self.scale:
            parts.append("scaled")
        return ", ".join(parts)

    def router_logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """The native router's logits ``[tokens, experts]``, computed directly: every supported router
        is one linear layer, and skipping its own selection saves work on every MoE layer. A linear
        submodule is called (not read), so accelerate's hooks on it still move its weight in place."""
        if self.linear:
            linear = getattr(router, self.linear)
            flat = hidden_states.reshape(-1, linear.weight.shape[-1])
            if self.logits_dtype == "weight":
                flat = flat.to(linear.weight.dtype)
            logits = linear(flat)
        else:
            weight, bias = router.weight, getattr(router, "bias", None)
            flat = hidden_states.reshape(-1, weight.shape[-1])
            if self.logits_dtype == "float32":
                flat, weight = flat.float(), weight.float()
                bias = None if bias is None else bias.float()
            elif self.logits_dtype == "weight":
                flat = flat.to(weight.dtype)
            logits = F.linear(flat, weight, bias)
        return logits.float() if self.logits_dtype == "float32_after" else logits

    def scores(self, router: nn.Module, logits: torch.Tensor, args: tuple) -> LayerScores:
        """What the rule ranks, counts and mixes for ``logits`` (see :class:`LayerScores`); ``args`` are the
        router's further positional arguments (where the block passes the selection bias)."""
        bias = self.selection_bias(router, args)
        if self.score == "softmax":
            candidates = None
            if self.groups is not None:
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                candidates = self.candidates(router, probs if bias is None else probs + bias)
            return softmax_scores(logits, bias, candidates)
        candidates = None
        if self.groups is not None:
            sigmoid = torch.sigmoid(logits.float() if self.mixing_float32 else logits)
            candidates = self.candidates(router, sigmoid if bias is None else sigmoid + bias)
        return sigmoid_scores(logits, bias, candidates, self.mixing_float32, self.rank_logits)

    def selection_bias(self, router: nn.Module, args: tuple) -> torch.Tensor | None:
        if self.bias == "router":
            return router.e_score_correction_bias
        if self.bias == "argument":
            return args[0] if args else None
        if self.bias == "statics":
            return router.moe_statics.e_score_correction_bias.squeeze()
        return None

    def candidates(self, router: nn.Module, scores: torch.Tensor) -> torch.Tensor | None:
        """The group-limited candidates ``[tokens, experts]``, None where every group is kept."""
        if router.topk_group >= router.num_group:
            return None
        return group_candidates(scores, router.num_group, router.topk_group, self.groups)

    def candidate_experts(self, router: nn.Module) -> int:
        """How many experts a token may choose from: all, or those of its ``topk_group`` best groups."""
        experts = int(router.num_experts)
        if self.groups is None or router.topk_group >= router.num_group:
            return experts
        return experts // int(router.num_group) * int(router.topk_group)

    def norm_topk_prob(self, router: nn.Module) -> bool:
        if self.renormalize == "config":
            return bool(router.norm_topk_prob)
        return self.renormalize == "always"

    def mixing(self, router: nn.Module) -> Mixing:
        """The layer's :class:`Mixing`: the family's epsilon, the router's floor and scaling factor."""
        floor = None if self.norm_floor is None else float(getattr(router, self.norm_floor))
        scale = 1.0 if self.scale is None else float(getattr(router, self.scale))
        return Mixing(eps=self.norm_eps, floor=floor, scale=scale)

    def weights_dtype_for(self, router_logits: torch.Tensor, hidden_states: torch.Tensor,
                          mixing_scores: torch.Tensor | None) -> torch.dtype:
        if self.weights_dtype == "mixing" and mixing_scores is not None:
            return mixing_scores.dtype
        return {"logits": router_logits.dtype, "hidden": hidden_states.dtype, "float32": torch.float32,
                "mixing": torch.float32}[self.weights_dtype]

    def native_output(self, router_logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> tuple:
        """What the native router returns, made of a selection (``[tokens, max_k]``, sentinel ``E``)."""
        if self.output == "topk":
            return router_logits, weights, indices
        tokens, experts = router_logits.shape
        dense = weights.new_zeros(tokens, experts + 1).scatter_(1, indices, weights)[:, :experts]
        return dense, router_logits


_SOFTMAX_SELECTION = (("softmax", {"renormalize": "always"}),
                      ("sigmoid", {"score": "sigmoid", "rank_logits": True, "mixing_float32": False}))
# The DeepSeek-V3 router (transformers' DeepseekV3TopkRouter, copied by the families built on it): float32
# logits, sigmoid scores plus e_score_correction_bias for choosing, the best topk_group of n_group groups
# by the sum of their two best scores, weights = the selected sigmoid scores, renormalised when
# norm_topk_prob (+1e-20), times routed_scaling_factor. Hub configs name the rule in two more fields.
_DEEPSEEK_V3 = dict(router_classes=("TopkRouter",), logits_dtype="float32", score="sigmoid", bias="router",
                    groups="top2_sum", norm_eps=1e-20, scale="routed_scaling_factor", weights_dtype="float32",
                    config_values=(("scoring_func", (None, "sigmoid")), ("topk_method", (None, "noaux_tc"))))

FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("olmoe"),
    Family("flex_olmo"),
    Family("qwen2_moe"),
    Family("qwen3_moe"),
    Family("qwen3_next"),
    Family("mixtral", renormalize="always", weights_dtype="float32"),
    Family("gpt_oss", router_attr="router", renormalize="always"),
    Family("granitemoe", router_attr="router", renormalize="always", weights_dtype="hidden",
           logits_dtype="float32_after"),
    Family("granitemoeshared", router_attr="router", renormalize="always", weights_dtype="hidden",
           logits_dtype="float32_after"),
    Family("granitemoe_swa", router_attr="router", renormalize="always", weights_dtype="hidden",
           logits_dtype="float32_after"),
    Family("granitemoehybrid", router_attr="router", renormalize="always", weights_dtype="hidden",
           logits_dtype="float32_after"),
    Family("mellum"),
    Family("minimax", renormalize="always", weights_dtype="float32"),
    Family("jamba", router_attr="router", renormalize="never", weights_dtype="hidden"),
    Family("qwen3_5_moe_text", renormalize="always"),
    Family("aria_text", router_attr="router", renormalize="always"),
    Family("qwen3_vl_moe", renormalize="always"),
    Family("lara_mini", logits_dtype="float32", weights_dtype="hidden"),
    Family("hunyuan_v1_moe", router_classes=("Gate",), linear="wg", logits_dtype="weight", renormalize="always"),
    Family("cohere2_moe", weights_dtype="hidden", variant="expert_selection_fn", variants=_SOFTMAX_SELECTION),
    Family("ernie4_5_moe", logits_dtype="float32", bias="statics", renormalize="always", norm_floor="norm_min",
           weights_dtype="hidden"),
    Family("deepseek_v2", router_classes=("TopkRouter",), logits_dtype="float32", renormalize="never",
           scale="routed_scaling_factor", variant="topk_method",
           variants=(("greedy", {}), ("group_limited_greedy", {"groups": "max"}))),
    *(Family(model_type, **_DEEPSEEK_V3) for model_type in (
        "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "solar_open",
        "sarvam_moe")),
    Family("minimax_m2", score="sigmoid", bias="argument", logits_dtype="weight", renormalize="always",
           weights_dtype="float32"),
    Family("lfm2_moe", score="sigmoid", bias="argument", norm_eps=1e-6, scale="routed_scaling_factor",
           mixing_float32=False),
    Family("afmoe", router_attr="router", router_classes=("TokenChoiceRouter",), linear="gate",
           logits_dtype="float32_after", score="sigmoid", bias="argument", renormalize="always", norm_eps=1e-20,
           scale="route_scale", weights_dtype="float32"),
    Family("llama4_text", router_attr="router", router_classes=("Llama4Router",), score="sigmoid", rank_logits=True,
           renormalize="never", output="dense", kernels=False),
)}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

REFUSED_MODEL_TYPES: dict[str, str] = {
    "phimoe": ("its sparsemixer always picks two experts and weights each by a softmax over a jitter-masked "
               "subset of logits that depends on the earlier pick, not by per-expert probabilities"),
    "longcat_flash": ("its zero-computation experts sit past the routed ones in the same index space and its "
                      "experts do not dispatch through transformers' experts implementations, so a variable-k "
                      "selection has no unused slot to hand them"),
    "jetmoe": ("its gate returns a dispatch plan (token order sorted by expert, expert sizes) for its own "
               "parallel-experts kernel, not (logits, weights, index)"),
    "dbrx": ("its top-k selection and p-norm weight normalisation are a method of the FFN block "
             "(route_tokens_to_experts), not a router module routelab can replace"),
    "kimi_linear": "its linear-attention layers need the fla kernels, which routelab does not install or test",
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
    """The :class:`Family` of ``model``, its variant chosen by the model's config; raises
    :class:`UnsupportedModelError` naming the reason (a refused family, or a config value routelab does
    not implement)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in FAMILIES:
        reason = REFUSED_MODEL_TYPES.get(model_type, "routelab has not verified its router and experts contract")
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: {reason}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    family = FAMILIES[model_type]
    for field, valid in family.config_values:
        value = config_value(config, field)
        if value not in valid:
            raise UnsupportedModelError(
                f"model type {model_type!r}: config field {field} = {value!r} is not implemented; routelab "
                f"implements {', '.join(repr(v) for v in valid if v is not None)}")
    if family.variant is None:
        return family
    value = config_value(config, family.variant)
    variants = dict(family.variants)
    if value not in variants:
        raise UnsupportedModelError(
            f"model type {model_type!r}: config field {family.variant} = {value!r} is not implemented; routelab "
            f"implements {', '.join(repr(v) for v in variants)}")
    return dataclasses.replace(family, variant=None, variants=(), **variants[value])


def config_value(config: Any, field: str) -> Any:
    """``field`` of a model config or of its text config (multimodal models), None where neither has it."""
    for candidate in (config, getattr(config, "get_text_config", lambda: None)()):
        if candidate is not None and hasattr(candidate, field):
            return getattr(candidate, field)
    return None


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks in forward order; raises for a model whose routers are not supported."""
    family = model_family(model)
    layers = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, family.router_attr, None), getattr(module, "experts", None)
        if gate is None or experts is None or not type(gate).__name__.endswith(family.router_classes):
            continue
        layers.append(MoELayer(len(layers), name, gate, experts))
    if not layers:
        raise UnsupportedModelError(
            f"model type {family.model_type!r}: no MoE block with a router {family.router_attr!r} "
            f"(class *{' / *'.join(family.router_classes)}) and 'experts' found; is this a dense variant?"
        )
    shapes = {(int(layer.gate.num_experts), int(layer.gate.top_k)) for layer in layers}
    if len(shapes) > 1:
        raise UnsupportedModelError(
            f"model type {family.model_type!r}: its MoE layers differ in (experts, top-k): {sorted(shapes)}; "
            "routelab routes models whose MoE layers all have the same expert count and top-k")
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
    candidate_experts: int | None = None  # experts a token may choose from (group-limited families); None: all
    router_score: str = "softmax"  # the family's router score (softmax or sigmoid): how the report reads logits


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
    candidates = family.candidate_experts(gate)
    return MoEShape(num_layers=len(layers), num_experts=num_experts, top_k=int(gate.top_k),
                    norm_topk_prob=family.norm_topk_prob(gate), expert_flops_per_selection=2.0 * weights / num_experts,
                    candidate_experts=None if candidates == num_experts else candidates, router_score=family.score)
