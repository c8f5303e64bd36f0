"""Install a routelab router in every MoE layer of a loaded transformers model, reversibly.

Each MoE block of a transformers v5 model has a ``gate`` (a ``*TopKRouter``) that returns
``(router_logits, top_k_weights, top_k_index)`` and ``experts`` that consume index and weights. We
swap the gate's class for a generated subclass whose ``forward`` keeps the native logits and replaces
the selection. Because it is a subclass, transformers' ``output_router_logits`` hooks (which match the
router class) still fire.

Variable k pads unused slots with the sentinel index ``num_experts``. The eager experts path skips
it, but ``grouped_mm`` leaves sentinel rows uninitialised and ``batched_mm`` indexes out of range;
both handle sentinels correctly when the experts module is flagged ``_is_expert_parallel`` (then
``grouped_mm`` sorts sentinels to the tail and skips them, ``batched_mm`` clamps and zeroes them),
so we set that flag on every experts module while the router is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .routers import Router

SUPPORTED_MODEL_TYPES = ("olmoe",)


class UnsupportedModelError(ValueError):
    """The model has no MoE routers routelab knows how to replace."""


@dataclass
class MoELayer:
    """One MoE block: its position among MoE blocks, its router (gate) and experts modules."""

    index: int
    name: str
    gate: nn.Module
    experts: nn.Module


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks in forward order; raises for a model whose routers are not supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    layers = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if gate is None or experts is None or not type(gate).__name__.endswith("TopKRouter"):
            continue
        layers.append(MoELayer(len(layers), name, gate, experts))
    if model_type not in SUPPORTED_MODEL_TYPES or not layers:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return layers


def model_routing_shape(model: nn.Module) -> tuple[int, int, int, bool]:
    """``(moe_layers, num_experts, top_k, norm_topk_prob)`` of a supported model."""
    layers = find_moe_layers(model)
    gate = layers[0].gate
    return len(layers), int(gate.num_experts), int(gate.top_k), bool(getattr(gate, "norm_topk_prob", False))


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original: type) -> type:
    if original not in _PATCHED_CLASSES:
        def forward(self, hidden_states: torch.Tensor):
            router_logits = original.forward(self, hidden_states)[0]
            state = self._routelab_state
            selection = state["router"](router_logits, state["layer"], self.norm_topk_prob)
            if state["recorder"] is not None:
                state["recorder"].record(state["layer"], router_logits, selection)
            return router_logits, selection.weights.to(router_logits.dtype), selection.indices

        _PATCHED_CLASSES[original] = type(f"Routelab{original.__name__}", (original,), {"forward": forward})
    return _PATCHED_CLASSES[original]


@contextlib.contextmanager
def install_router(model: nn.Module, router: Router, recorder: Any | None = None) -> Iterator[list[MoELayer]]:
    """Route every MoE layer of ``model`` with ``router`` inside the ``with`` block, then restore it.

    ``recorder`` (optional) receives ``record(layer, router_logits, selection)`` for every layer call.
    """
    layers = find_moe_layers(model)
    if any(hasattr(layer.gate, "_routelab_state") for layer in layers):
        raise RuntimeError("a routelab router is already installed in this model; leave that block first")
    saved = [(layer.gate.__class__, getattr(layer.experts, "_is_expert_parallel", None)) for layer in layers]
    try:
        for layer in layers:
            layer.gate._routelab_state = {"router": router, "layer": layer.index, "recorder": recorder}
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
