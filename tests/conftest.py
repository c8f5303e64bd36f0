"""Shared fixtures: tiny random OLMoE checkpoints (tests/support/models.py), and a fixed seed per test.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadscope`` in pyproject.toml): each test
module stays on one worker, so a module's pipeline run is shared by its tests as without xdist.
"""

from __future__ import annotations

import os

import pytest

from tests.support.models import save_tiny_olmoe, seed_everything

# Modules whose shared setup runs the pipeline for minutes: collected first, so that with two workers
# they start at once and the unit tests fill the other worker instead of waiting at the end.
SLOW_MODULES = ("test_slurm.py", "test_pipeline.py", "test_pipeline_tasks.py")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores: one torch thread each, or OpenMP threads spin against each other.
        # Subprocesses (snakemake jobs) are unaffected; they set their own threads.
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))  # stable: the rest keep their order


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
