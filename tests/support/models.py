"""Tiny random MoE checkpoints saved with ``save_pretrained`` and the checks every family shares.

Tests load them back through ``AutoModelForCausalLM.from_pretrained(path, experts_implementation=...)``
exactly as the pipeline does, so every experts kernel can be exercised on the same weights.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from routelab.model.experts import SUPPORTED_KERNELS
from routelab.model.patching import install_router
from routelab.routing import TopKRouter
from routelab.routing.nulls import fit_kde_null

KERNELS = SUPPORTED_KERNELS
TINY_OLMOE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    pad_token_id=1, eos_token_id=0, bos_token_id=None, tie_word_embeddings=False,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_tiny_olmoe(path, norm_topk_prob: bool, seed: int) -> str:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    seed_everything(seed)
    # Larger-than-default router init spreads the router probabilities, so top-k ties are
    # (almost surely) absent and the selection is a stable function of the hidden states.
    config = OlmoeConfig(**TINY_OLMOE, norm_topk_prob=norm_topk_prob, initializer_range=0.2)
    model = OlmoeForCausalLM(config).eval()
    model.save_pretrained(path)
    return str(path)


def load_tiny(path: str, experts_implementation: str | None = "eager", dtype=torch.float32):
    """The checkpoint at ``path`` through the pipeline's loader class (``AutoModelForCausalLM`` but for the
    vision-language families); ``experts_implementation`` None: the model's default (families without
    experts kernels take no choice)."""
    from transformers import AutoConfig

    from routelab.model.loading import model_loader

    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    model = model_loader(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval()


def batch(seed: int = 0, size: tuple[int, int] = (3, 12)) -> torch.Tensor:
    """Token ids ``[batch, seq]`` of the tiny models' vocabulary (ids 0 and 1 are EOS and padding)."""
    return torch.randint(2, 128, size, generator=torch.Generator().manual_seed(seed))


def own_null(model, num_experts: int):
    """A kde null fitted on the unpatched model's own router logits (independent calibration inputs)."""
    with torch.no_grad():
        out = model(input_ids=batch(seed=100, size=(8, 32)), output_router_logits=True)
    return fit_kde_null([logits.numpy() for logits in out.router_logits], num_experts=num_experts, grid_size=512)


class SelectionCapture:
    """A recorder that keeps the last selection of every layer."""

    def __init__(self):
        self.selections = {}

    def record(self, layer, router_logits, selection):
        self.selections[layer] = selection


def routed_logits(model, router, inputs, capture=None):
    """The model's logits with ``router`` installed (``capture`` sees every layer's selection)."""
    with torch.no_grad(), install_router(model, router, recorder=capture):
        return model(input_ids=inputs).logits


def assert_topk_reproduces_native(model, inputs: torch.Tensor, num_experts: int, top_k: int,
                                  router_logits_atol: float) -> None:
    """The check every supported family must pass: ``TopKRouter(E, model k)`` gives the native forward (logits
    within 1e-5), ``output_router_logits`` still works (the patched router subclasses the native one, so
    transformers' hooks see it), and the model's module classes are restored afterwards."""
    native_classes = [type(module) for module in model.modules()]
    with torch.no_grad():
        native = model(input_ids=inputs, output_router_logits=True)
        with install_router(model, TopKRouter(num_experts, top_k)):
            patched = model(input_ids=inputs, output_router_logits=True)
    assert (native.logits - patched.logits).abs().max().item() <= 1e-5
    assert len(patched.router_logits) == len(native.router_logits) == 2
    for ours, theirs in zip(patched.router_logits, native.router_logits):
        assert ours.shape == (inputs.numel(), num_experts)
        torch.testing.assert_close(ours, theirs, atol=router_logits_atol, rtol=0)
    assert [type(module) for module in model.modules()] == native_classes
