"""Install a routelab router in every MoE layer of a loaded transformers model, reversibly.

The router of each MoE block (see :mod:`routelab.model.families`) has its class swapped for a
generated subclass whose ``forward`` keeps the native logits and replaces the selection. Because it
is a subclass, transformers' ``output_router_logits`` hooks (which match the router class) still
fire. A variable-k router also switches the experts to a compacting kernel
(:mod:`routelab.model.experts`), since not every native kernel accepts the sentinel slots.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from routelab.model.experts import compacting_experts
from routelab.model.families import Family, MoELayer, find_moe_layers, model_family
from routelab.routing.contract import (
    Router,
    RouterConfigError,
    check_finite_logits,
    nonfinite_tokens,
    raise_nonfinite,
)

_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original: type) -> type:
    if original not in _PATCHED_CLASSES:
        def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
            state = self._routelab_state
            family: Family = state["family"]
            router_logits = family.router_logits(self, hidden_states)
            if router_logits.device.type == "cpu":
                check_finite_logits(router_logits, state["layer"])
                checked = router_logits
            else:
                # Checking here would wait for the device every layer: count the bad tokens on the device
                # and check once per forward (_NonFiniteCheck); meanwhile route on finite stand-ins so
                # the index arithmetic of the routers stays in range.
                state["nonfinite"].add(state["layer"], router_logits)
                checked = torch.nan_to_num(router_logits)
            scores = family.scores(self, checked, args)
            # The raw logits were checked: the selection scores may hold -inf outside the candidate groups.
            selection = state["router"](scores.ranked, state["layer"], family.norm_topk_prob(self), probs=scores.probs,
                                        check_finite=False, mixing_scores=scores.mixing, mixing=state["mixing"],
                                        probability_order=scores.probability_order)
            selection.scores, selection.softmax_logits = scores.scores, scores.softmax_logits
            if state["recorder"] is not None:
                state["recorder"].record(state["layer"], router_logits, selection)
            dtype = family.weights_dtype_for(router_logits, hidden_states, scores.mixing)
            return family.native_output(router_logits, selection.weights.to(dtype), selection.indices)

        _PATCHED_CLASSES[original] = type(f"Routelab{original.__name__}", (original,), {"forward": forward})
    return _PATCHED_CLASSES[original]


class _NonFiniteCheck:
    """Deferred check of router logits on accelerators: per layer, the count of tokens with NaN or
    infinite logits stays on the device; :meth:`check` reads all of them at once (one host sync per
    forward instead of one per layer) and raises the error :func:`routelab.routing.contract.check_finite_logits`
    would have raised for the first bad layer."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, torch.Tensor, int]] = []

    def add(self, layer: int, logits: torch.Tensor) -> None:
        self.pending.append((layer, nonfinite_tokens(logits), logits.shape[0]))

    def clear(self, *_: Any) -> None:
        self.pending.clear()

    def check(self, *_: Any) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        counts = torch.stack([count.to(pending[0][1].device) for _, count, _ in pending]).tolist()
        for (layer, _, tokens), bad in zip(pending, counts):
            if bad:
                raise_nonfinite(layer, bad, tokens)


class _ForwardShape:
    """A forward pre-hook that tells the router the batch's shape, mask and cache length
    (:meth:`Router.begin_forward`): the layers see tokens flattened, and a window-wide rule needs the windows."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.x names it cache
        cached = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.router.begin_forward(int(tokens.shape[0]), int(tokens.shape[1]), kwargs.get("attention_mask"), cached)


@contextlib.contextmanager
def install_router(model: nn.Module, router: Router, recorder: Any | None = None) -> Iterator[list[MoELayer]]:
    """Route every MoE layer of ``model`` with ``router`` inside the ``with`` block, then restore it.

    ``recorder`` (optional; a :class:`routelab.record.Recording`, or any object with the method) receives
    ``record(layer, router_logits, selection)`` for every layer call.
    NaN or infinite router logits raise ``ValueError`` naming the layer: on CPU from the layer itself,
    on accelerators when ``model``'s forward returns (or when the block ends, if only a submodule ran).
    """
    family = model_family(model)
    layers = find_moe_layers(model)
    if any(hasattr(layer.gate, "_routelab_state") for layer in layers):
        raise RuntimeError("a routelab router is already installed in this model; leave that block first")
    saved = [layer.gate.__class__ for layer in layers]
    router.check_layers(len(layers))
    candidates = family.candidate_experts(layers[0].gate)
    if router.max_k > candidates:
        raise RouterConfigError(
            f"max_k: {router.max_k} exceeds the {candidates} experts a token may choose from (model type "
            f"{family.model_type!r} limits each token to its best {layers[0].gate.topk_group} of "
            f"{layers[0].gate.num_group} expert groups); need max_k <= {candidates}")
    nonfinite = _NonFiniteCheck()
    hooked: list[tuple[nn.Module, Any]] = []
    hooks = [model.register_forward_pre_hook(nonfinite.clear), model.register_forward_hook(nonfinite.check),
             model.register_forward_pre_hook(_ForwardShape(router), with_kwargs=True)]
    # Fixed k produces no sentinel, and experts that compute every expert (Llama 4) take any selection:
    # then the experts stay as they are.
    experts = (compacting_experts(model, [layer.experts for layer in layers])
               if router.min_k < router.max_k and family.kernels else contextlib.nullcontext())
    try:
        with experts:
            for layer in layers:
                layer.gate._routelab_state = {"router": router, "layer": layer.index, "recorder": recorder,
                                              "family": family, "nonfinite": nonfinite,
                                              "mixing": family.mixing(layer.gate)}
                layer.gate.__class__ = _patched_class(layer.gate.__class__)
                _through_accelerate_hook(layer.gate, hooked)
            yield layers
            nonfinite.check()
    finally:
        for hook in hooks:
            hook.remove()
        for layer, gate_class in zip(layers, saved):
            layer.gate.__class__ = gate_class
            layer.gate.__dict__.pop("_routelab_state", None)
        for gate, old_forward in hooked:
            gate._old_forward = old_forward


def _through_accelerate_hook(gate: nn.Module, hooked: list[tuple[nn.Module, Any]]) -> None:
    """Make an accelerate-hooked router call the patched forward (``device_map`` / offload).

    accelerate's ``add_hook_to_module`` replaces the instance's ``forward`` with a wrapper that moves the
    weights in, then calls ``module._old_forward``: the forward bound before the class was swapped. Rebinding
    ``_old_forward`` to the patched class's forward keeps the hook around it (weights loaded from the
    offload store, outputs moved); the original is put back on exit (kept in ``hooked``).
    """
    if "_old_forward" in gate.__dict__ and hasattr(gate, "_hf_hook"):
        hooked.append((gate, gate._old_forward))
        gate._old_forward = types.MethodType(type(gate).forward, gate)
