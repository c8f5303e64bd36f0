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

Variable k pads unused slots with the sentinel index ``num_experts`` (weight 0). transformers'
experts kernels do not all accept it (``grouped_mm`` leaves sentinel rows uninitialised, ``batched_mm``
indexes out of range, gpt_oss's eager path has no class for it), so while a variable-k router is
installed each experts module gets a forward that hands its kernel only the real (token, expert)
pairs (:func:`_compacting_forward`): correct on every kernel, and compute proportional to the experts
actually selected. Fixed-k routers produce no sentinel and leave the experts untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .routers import Router, nonfinite_tokens, raise_nonfinite, softmax_float32


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
            state = self._routelab_state
            family: Family = state["family"]
            router_logits = family.router_logits(self, hidden_states)
            routed = router_logits
            if router_logits.device.type != "cpu":
                # Checking here would wait for the device every layer: count the bad tokens on the device
                # and check once per forward (_NonFiniteCheck); meanwhile route on finite stand-ins so
                # the index arithmetic of the routers stays in range.
                state["nonfinite"].add(state["layer"], router_logits)
                routed = torch.nan_to_num(router_logits)
            selection = state["router"](routed, state["layer"], family.norm_topk_prob(self),
                                        probs=family.expert_probs(routed), check_finite=routed is router_logits)
            if state["recorder"] is not None:
                state["recorder"].record(state["layer"], router_logits, selection)
            indices = selection.indices
            weights = selection.weights.to(family.weights_dtype_for(router_logits, hidden_states))
            return router_logits, weights, indices

        _PATCHED_CLASSES[original] = type(f"Routelab{original.__name__}", (original,), {"forward": forward})
    return _PATCHED_CLASSES[original]


class _NonFiniteCheck:
    """Deferred check of router logits on accelerators: per layer, the count of tokens with NaN or
    infinite logits stays on the device; :meth:`check` reads all of them at once (one host sync per
    forward instead of one per layer) and raises the error :func:`routelab.routers.check_finite_logits`
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


@contextlib.contextmanager
def install_router(model: nn.Module, router: Router, recorder: Any | None = None) -> Iterator[list[MoELayer]]:
    """Route every MoE layer of ``model`` with ``router`` inside the ``with`` block, then restore it.

    ``recorder`` (optional) receives ``record(layer, router_logits, selection)`` for every layer call.
    NaN or infinite router logits raise ``ValueError`` naming the layer: on CPU from the layer itself,
    on accelerators when ``model``'s forward returns (or when the block ends, if only a submodule ran).
    """
    family = model_family(model)
    layers = find_moe_layers(model)
    if any(hasattr(layer.gate, "_routelab_state") for layer in layers):
        raise RuntimeError("a routelab router is already installed in this model; leave that block first")
    saved = [layer.gate.__class__ for layer in layers]
    variable_k = router.min_k < router.max_k
    nonfinite = _NonFiniteCheck()
    hooks = [model.register_forward_pre_hook(nonfinite.clear), model.register_forward_hook(nonfinite.check)]
    try:
        for layer in layers:
            layer.gate._routelab_state = {"router": router, "layer": layer.index, "recorder": recorder,
                                          "family": family, "nonfinite": nonfinite}
            layer.gate.__class__ = _patched_class(layer.gate.__class__)
            if variable_k:
                layer.experts.forward = _compacting_forward(layer.experts)
        yield layers
        nonfinite.check()
    finally:
        for hook in hooks:
            hook.remove()
        for layer, gate_class in zip(layers, saved):
            layer.gate.__class__ = gate_class
            layer.gate.__dict__.pop("_routelab_state", None)
            layer.experts.__dict__.pop("forward", None)


def _compacting_forward(experts: nn.Module) -> Callable[..., torch.Tensor]:
    """Experts forward for variable k: only real (token, expert) pairs reach the experts kernel.

    The padded ``[tokens, max_k]`` selection is flattened to its ``P`` real pairs. Under the
    ``grouped_mm`` kernel they are computed by :func:`_grouped_pairs` (the kernel's own steps, on the
    pairs alone); under any other kernel (eager, batched_mm, ...) they are passed to the module's own
    forward as a top-1 problem (``[P, 1]`` index and weight). Either way no kernel sees a sentinel and
    only the selected experts are computed; the pair outputs are then summed per token. Finding the
    pairs is one data-dependent step (a host sync per MoE layer on GPU). On CPU the sum is an
    ``index_add_`` over the ``P`` pairs (deterministic there); elsewhere ``index_add_`` adds in a
    nondeterministic order, so the pair outputs are put back in their ``[tokens, max_k]`` slots and
    summed per token, as the native kernels do.
    """
    native = type(experts).forward
    num_experts = int(experts.num_experts)

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens, slots = top_k_index.shape
        flat_index = top_k_index.reshape(-1)
        pairs = (flat_index < num_experts).nonzero().squeeze(-1)  # [P], token-major
        pair_experts = flat_index.index_select(0, pairs)
        # index_select: on CPU several times faster than advanced indexing for the same gather.
        if _grouped_pairs is not None and not args and not kwargs and _runs_grouped_mm(experts):
            pair_experts, by_expert = torch.sort(pair_experts, stable=True)
            pairs = pairs.index_select(0, by_expert)
            pair_tokens = torch.div(pairs, slots, rounding_mode="floor")
            out = _grouped_pairs(experts, hidden_states.index_select(0, pair_tokens), pair_experts,
                                 top_k_weights.reshape(-1).index_select(0, pairs))
        else:
            pair_tokens = torch.div(pairs, slots, rounding_mode="floor")
            out = native(experts, hidden_states.index_select(0, pair_tokens), pair_experts.unsqueeze(-1),
                         top_k_weights.reshape(-1).index_select(0, pairs).unsqueeze(-1), *args, **kwargs)
        if out.device.type == "cpu":
            # Accumulate in at least float32, as the native per-token sum does.
            total = torch.zeros(tokens, out.shape[-1], dtype=torch.promote_types(out.dtype, torch.float32))
            return total.index_add_(0, pair_tokens, out).to(hidden_states.dtype)
        slotted = out.new_zeros(tokens * slots, out.shape[-1]).index_copy_(0, pairs, out)
        return slotted.view(tokens, slots, -1).sum(dim=1).to(hidden_states.dtype)

    return forward


def _runs_grouped_mm(experts: nn.Module) -> bool:
    """Whether ``experts`` dispatches to transformers' ``grouped_mm`` kernel (and has its attributes)."""
    config = getattr(experts, "config", None)
    return (getattr(config, "_experts_implementation", None) == "grouped_mm"
            and all(hasattr(experts, name) for name in ("has_gate", "has_bias", "is_transposed", "down_proj")))


try:  # transformers' grouped linear layer (offsets-based grouped GEMM with its CPU and old-torch fallbacks)
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # a transformers without it: every kernel takes the top-1 route through its own forward
    _grouped_linear = None


def _grouped_pairs_impl(experts: nn.Module, pair_hidden: torch.Tensor, pair_experts: torch.Tensor,
                        pair_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts computation on ``P`` pairs already sorted by expert.

    ``pair_hidden`` ``[P, hidden]``, ``pair_experts`` ``[P]`` non-decreasing, ``pair_weights`` ``[P]``;
    returns the weighted expert outputs ``[P, hidden]``. The native kernel first sorts and gathers the
    (token, slot) rows and afterwards scatters them back; here the rows arrive gathered and in order,
    which saves two ``[P, hidden]`` gathers and a sort per layer.
    """
    counts = torch.bincount(pair_experts, minlength=experts.num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    prefix = "gate_up_proj" if experts.has_gate else "up_proj"
    bias = getattr(experts, f"{prefix}_bias")[pair_experts] if experts.has_bias else None
    projected = _grouped_linear(pair_hidden, getattr(experts, prefix), offsets, bias=bias,
                                is_transposed=experts.is_transposed)
    projected = experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)
    bias = experts.down_proj_bias[pair_experts] if experts.has_bias else None
    projected = _grouped_linear(projected, experts.down_proj, offsets, bias=bias, is_transposed=experts.is_transposed)
    if getattr(experts, "has_post_expert_norm", False):
        projected = experts.post_expert_norm(projected)
    return projected.mul_(pair_weights.unsqueeze(-1).to(projected.dtype))  # in place: no fresh [P, hidden] block


_grouped_pairs = None if _grouped_linear is None else _grouped_pairs_impl


def expert_flops_per_selection(model: nn.Module) -> float:
    """FLOPs of one token through one selected expert (2 per multiply-add of every expert weight).

    Read off the first MoE block's experts parameters (``[experts, ...]`` tensors), so it holds for
    any supported family's expert shape (gated or not, with or without biases).
    """
    experts = find_moe_layers(model)[0].experts
    num_experts = int(experts.num_experts)
    weights = sum(p.numel() for p in experts.parameters() if p.dim() >= 2 and p.shape[0] == num_experts)
    return 2.0 * weights / num_experts
