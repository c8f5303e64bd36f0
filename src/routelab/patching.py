"""Install a routelab router in every MoE layer of a loaded transformers model, reversibly.

Each MoE block of a transformers v5 model has a router (a ``*TopKRouter``, named ``gate`` or
``router`` depending on the family) that returns ``(router_logits, top_k_weights, top_k_index)`` and
``experts`` that consume index and weights. We swap the router's class for a generated subclass whose
``forward`` keeps the native logits and replaces the selection. Because it is a subclass,
transformers' ``output_router_logits`` hooks (which match the router class) still fire.

A :class:`Family` records what differs between model families: where the router sits, which expert
probabilities the native weights are taken from, whether they are renormalised over the selected
experts, and the dtype they are handed to the experts in. With it, ``TopKRouter(E, model_k)``
reproduces each supported family's native forward. Families whose native selection is not a top-k
over one per-token score, or whose weights are not a function of per-expert probabilities, are
refused with the reason (:data:`REFUSED_MODEL_TYPES`).

Variable k pads unused slots with the sentinel index ``num_experts``. Most eager experts paths skip
it, but ``grouped_mm`` leaves sentinel rows uninitialised and ``batched_mm`` indexes out of range;
both handle sentinels correctly when the experts module is flagged ``_is_expert_parallel`` (then
``grouped_mm`` sorts sentinels to the tail and skips them, ``batched_mm`` clamps and zeroes them),
so we set that flag on every experts module while the router is installed. An eager path that
cannot skip the sentinel (gpt_oss) gets padded slots pointing at expert 0 with weight 0 instead:
the same output, at the cost of computing expert 0 for those slots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .routers import Router


def softmax_probs(router_logits: torch.Tensor) -> torch.Tensor:
    """Softmax over experts in float32: ``[tokens, experts]`` logits -> probabilities."""
    return torch.softmax(router_logits, dim=-1, dtype=torch.float32)


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
    eager_skips_sentinel: bool = True
    expert_probs: Callable[[torch.Tensor], torch.Tensor] = softmax_probs

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
    Family("gpt_oss", router_attr="router", renormalize="always", eager_skips_sentinel=False),
    Family("granitemoe", router_attr="router", renormalize="always", weights_dtype="hidden"),
    Family("granitemoeshared", router_attr="router", renormalize="always", weights_dtype="hidden"),
    Family("granitemoe_swa", router_attr="router", renormalize="always", weights_dtype="hidden"),
    Family("granitemoehybrid", router_attr="router", renormalize="always", weights_dtype="hidden"),
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


def model_routing_shape(model: nn.Module) -> tuple[int, int, int, bool]:
    """``(moe_layers, num_experts, top_k, norm_topk_prob)`` of a supported model."""
    family = model_family(model)
    layers = find_moe_layers(model)
    gate = layers[0].gate
    return len(layers), int(gate.num_experts), int(gate.top_k), family.norm_topk_prob(gate)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original: type) -> type:
    if original not in _PATCHED_CLASSES:
        def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
            router_logits = original.forward(self, hidden_states, *args, **kwargs)[0]
            state = self._routelab_state
            family: Family = state["family"]
            selection = state["router"](router_logits, state["layer"], family.norm_topk_prob(self),
                                        probs=family.expert_probs(router_logits))
            if state["recorder"] is not None:
                state["recorder"].record(state["layer"], router_logits, selection)
            indices = selection.indices
            if state["pad_index"] != self.num_experts:
                indices = indices.masked_fill(indices == self.num_experts, state["pad_index"])
            weights = selection.weights.to(family.weights_dtype_for(router_logits, hidden_states))
            return router_logits, weights, indices

        _PATCHED_CLASSES[original] = type(f"Routelab{original.__name__}", (original,), {"forward": forward})
    return _PATCHED_CLASSES[original]


def _pad_index(family: Family, layer: MoELayer) -> int:
    """Index the experts receive in unused slots: the sentinel, or expert 0 (weight 0) where unsupported."""
    implementation = getattr(getattr(layer.experts, "config", None), "_experts_implementation", None)
    eager = implementation in (None, "eager")
    return 0 if eager and not family.eager_skips_sentinel else int(layer.gate.num_experts)


@contextlib.contextmanager
def install_router(model: nn.Module, router: Router, recorder: Any | None = None) -> Iterator[list[MoELayer]]:
    """Route every MoE layer of ``model`` with ``router`` inside the ``with`` block, then restore it.

    ``recorder`` (optional) receives ``record(layer, router_logits, selection)`` for every layer call.
    """
    family = model_family(model)
    layers = find_moe_layers(model)
    if any(hasattr(layer.gate, "_routelab_state") for layer in layers):
        raise RuntimeError("a routelab router is already installed in this model; leave that block first")
    saved = [(layer.gate.__class__, getattr(layer.experts, "_is_expert_parallel", None)) for layer in layers]
    try:
        for layer in layers:
            layer.gate._routelab_state = {"router": router, "layer": layer.index, "recorder": recorder,
                                          "family": family, "pad_index": _pad_index(family, layer)}
            layer.gate.__class__ = _patched_class(layer.gate.__class__)
            if hasattr(layer.experts, "_is_expert_parallel"):
                layer.experts._is_expert_parallel = True
        yield layers
    finally:
        for layer, (gate_class, expert_parallel) in zip(layers, saved):
            layer.gate.__class__ = gate_class
            layer.gate.__dict__.pop("_routelab_state", None)
            if expert_parallel is not None:
                layer.experts._is_expert_parallel = expert_parallel
