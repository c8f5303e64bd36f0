"""Shared fixtures: tiny random OLMoE checkpoints (tests/support/models.py), and a fixed seed per test."""

from __future__ import annotations

import pytest

from tests.support.models import save_tiny_olmoe, seed_everything


@pytest.fixture(scope="session")
def tiny_olmoe_dir(tmp_path_factory) -> str:
    """A tiny random OLMoE (8 experts, top-2, 2 layers, ``norm_topk_prob=False`` as OLMoE-1B-7B)."""
    return save_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe"), norm_topk_prob=False, seed=0)


@pytest.fixture(scope="session")
def tiny_olmoe_norm_dir(tmp_path_factory) -> str:
    """The same architecture with ``norm_topk_prob=True`` (top-k weights renormalised by the model)."""
    return save_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe_norm"), norm_topk_prob=True, seed=1)


@pytest.fixture(autouse=True)
def _seeded():
    seed_everything(1234)
