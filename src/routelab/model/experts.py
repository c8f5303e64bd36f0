"""Experts for variable k: only the real (token, expert) pairs reach transformers' experts kernel.

A variable-k selection pads unused slots with the sentinel index ``num_experts`` (weight 0).
transformers' experts kernels do not all accept it (``grouped_mm`` leaves sentinel rows
uninitialised, ``batched_mm`` indexes out of range, gpt_oss's eager path has no class for it), so
while a variable-k router is installed the model's experts run a compacting kernel instead: the
padded ``[tokens, max_k]`` selection is flattened to its ``P`` real pairs, which the configured
kernel computes, and the pair outputs are summed per token. Correct on every kernel, and compute
proportional to the experts actually selected.

The compacting kernels go through transformers' own seam for experts implementations: one is
registered with ``ExpertsInterface`` per native kernel (``routelab_compact_<kernel>``) and
:func:`compacting_experts` switches the model to it with ``set_experts_implementation``, then back.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from routelab.model.families import UnsupportedModelError

# Private, and kept: the grouped GEMM on pairs already gathered and sorted by expert (no second sort and
# gather), with transformers' own per-device and per-version choice of grouped_mm or its fallback.
try:
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # a transformers without it: the grouped_mm kernel takes the pairs as a top-1 problem
    _grouped_linear = None

COMPACT_PREFIX = "routelab_compact_"
# The transformers experts kernels routelab is tested on (every router, every supported family); the
# config schema's experts_implementation choices come from here.
SUPPORTED_KERNELS = ("eager", "grouped_mm", "batched_mm")


def compact_kernel_name(kernel: str) -> str:
    """The registered name of the compacting kernel wrapping the native kernel ``kernel``."""
    return kernel if kernel.startswith(COMPACT_PREFIX) else f"{COMPACT_PREFIX}{kernel}"


def _compacting(kernel: str) -> Callable[..., torch.Tensor]:
    """The experts forward for variable k around the native kernel ``kernel`` (``eager`` or a kernel of
    ``ALL_EXPERTS_FUNCTIONS``).

    Under ``grouped_mm`` the pairs are computed by :func:`_grouped_pairs` (the kernel's own steps, on the
    pairs alone); under any other kernel they are passed to it as a top-1 problem (``[P, 1]`` index and
    weight). Finding the pairs is one data-dependent step (a host sync per MoE layer on GPU). On CPU the
    sum is an ``index_add_`` over the ``P`` pairs (deterministic there); elsewhere ``index_add_`` adds in
    a nondeterministic order, so the pair outputs are put back in their ``[tokens, max_k]`` slots and
    summed per token, as the native kernels do.
    """

    def forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens, slots = top_k_index.shape
        flat_index = top_k_index.reshape(-1)
        pairs = (flat_index < self.num_experts).nonzero().squeeze(-1)  # [P], token-major
        pair_experts = flat_index.index_select(0, pairs)
        # index_select: on CPU several times faster than advanced indexing for the same gather.
        if kernel == "grouped_mm" and _grouped_linear is not None and not args and not kwargs:
            pair_experts, by_expert = torch.sort(pair_experts, stable=True)
            pairs = pairs.index_select(0, by_expert)
            pair_tokens = torch.div(pairs, slots, rounding_mode="floor")
            out = _grouped_pairs(self, hidden_states.index_select(0, pair_tokens), pair_experts,
                                 top_k_weights.reshape(-1).index_select(0, pairs))
        else:
            pair_tokens = torch.div(pairs, slots, rounding_mode="floor")
            native = ALL_EXPERTS_FUNCTIONS.get_interface(kernel, inspect.unwrap(type(self).forward))
            out = native(self, hidden_states.index_select(0, pair_tokens), pair_experts.unsqueeze(-1),
                         top_k_weights.reshape(-1).index_select(0, pairs).unsqueeze(-1), *args, **kwargs)
        if out.device.type == "cpu":
            # Accumulate in at least float32, as the native per-token sum does; index_add_ needs the source
            # in the buffer's dtype (a bf16/fp16 model's pair outputs are not).
            total = torch.zeros(tokens, out.shape[-1], dtype=torch.promote_types(out.dtype, torch.float32))
            return total.index_add_(0, pair_tokens, out.to(total.dtype)).to(hidden_states.dtype)
        slotted = out.new_zeros(tokens * slots, out.shape[-1]).index_copy_(0, pairs, out)
        return slotted.view(tokens, slots, -1).sum(dim=1).to(hidden_states.dtype)

    return forward


def _grouped_pairs(experts: nn.Module, pair_hidden: torch.Tensor, pair_experts: torch.Tensor,
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


def _register(kernel: str) -> str:
    name = compact_kernel_name(kernel)
    if name not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(name, _compacting(kernel))
    return name


@contextlib.contextmanager
def compacting_experts(model: nn.Module, experts_modules: list[nn.Module]) -> Iterator[None]:
    """Run ``model``'s experts (``experts_modules``, one per MoE layer) with the compacting kernel of
    their configured kernel inside the block; the model's own experts implementation afterwards."""
    saved = model.get_experts_implementation()
    model.set_experts_implementation({key: _register(kernel) for key, kernel in saved.items() if kernel is not None})
    try:
        for experts in experts_modules:
            kernel = getattr(getattr(experts, "config", None), "_experts_implementation", None)
            if kernel is None or not kernel.startswith(COMPACT_PREFIX):
                raise UnsupportedModelError(
                    f"{type(experts).__name__} does not dispatch through transformers' experts implementations "
                    f"(its config says {kernel!r}), so variable-k routing cannot hand it only the selected experts")
        yield
    finally:
        model.set_experts_implementation(saved)
