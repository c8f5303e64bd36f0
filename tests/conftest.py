"""Shared fixtures: tiny random OLMoE checkpoints saved with ``save_pretrained``.

Tests load them back through ``AutoModelForCausalLM.from_pretrained(path, experts_implementation=...)``
exactly as the pipeline does, so every experts kernel can be exercised on the same weights.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

TINY_OLMOE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    pad_token_id=1, eos_token_id=0, bos_token_id=None, tie_word_embeddings=False,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_tiny_olmoe(path, norm_topk_prob: bool, seed: int) -> str:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    seed_everything(seed)
    # Larger-than-default router init spreads the router probabilities, so top-k ties are
    # (almost surely) absent and the selection is a stable function of the hidden states.
    config = OlmoeConfig(**TINY_OLMOE, norm_topk_prob=norm_topk_prob, initializer_range=0.2)
    model = OlmoeForCausalLM(config).eval()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_olmoe_dir(tmp_path_factory) -> str:
    """A tiny random OLMoE (8 experts, top-2, 2 layers, ``norm_topk_prob=False`` as OLMoE-1B-7B)."""
    return _save_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe"), norm_topk_prob=False, seed=0)


@pytest.fixture(scope="session")
def tiny_olmoe_norm_dir(tmp_path_factory) -> str:
    """The same architecture with ``norm_topk_prob=True`` (top-k weights renormalised by the model)."""
    return _save_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe_norm"), norm_topk_prob=True, seed=1)


def load_tiny(path: str, experts_implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=experts_implementation,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(autouse=True)
def _seeded():
    seed_everything(1234)
