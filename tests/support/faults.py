"""Fault injection for the route job's tests: out-of-memory errors, other errors and kills at a chosen
batch, so retries and resumes can be tested on real runs.

``ROUTELAB_INJECT_FAULT`` (JSON ``{"kind": "oom" | "error" | "interrupt", "after_batches": N,
"min_batch_size": B}``) makes a route job raise that failure before its batch ``N`` (0-based, counted
from the start of the run in this process) when the batch size is at least ``B`` (default 1): a CUDA
out-of-memory error, a RuntimeError, or a KeyboardInterrupt (a kill, without a failure marker).
``"kind": "slow"`` (with ``"seconds": S``) raises nothing and waits S seconds before every batch from
batch ``N`` on: a window in which a test can kill the job's process from outside.

The injector is one more recorder of the route job (:func:`with_faults` wraps
``routelab.run.route.make_recorders``); production code has no hook for it. In-process tests install it
with :func:`install`; a Snakemake run gets it from ``faults_site/sitecustomize.py`` on ``PYTHONPATH``
(:data:`SITE`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FAULT_ENV = "ROUTELAB_INJECT_FAULT"
SITE = Path(__file__).resolve().parent / "faults_site"  # put on PYTHONPATH: route jobs get the injector


class FaultInjector:
    """A recorder that raises the failure :data:`FAULT_ENV` asks for (inert when unset)."""

    def __init__(self, batch_size: int):
        spec = json.loads(os.environ.get(FAULT_ENV) or "null")
        self.kind = spec["kind"] if spec and batch_size >= spec.get("min_batch_size", 1) else None
        self.after = spec.get("after_batches", 0) if spec else 0
        self.seconds = spec.get("seconds", 0) if spec else 0
        self.batches = 0

    def begin_batch(self, batch: Any) -> None:
        if self.kind == "slow" and self.batches >= self.after:
            time.sleep(self.seconds)
        elif self.kind is not None and self.batches == self.after:
            if self.kind == "oom":
                import torch

                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV})")
            if self.kind == "interrupt":
                raise KeyboardInterrupt(f"injected by {FAULT_ENV}")
            raise RuntimeError(f"injected failure ({FAULT_ENV})")
        self.batches += 1

    def record(self, *args: Any) -> None:
        pass

    def end_batch(self) -> None:
        pass

    def close(self) -> None:
        pass


def with_faults(make_recorders):
    """``make_recorders`` with a :class:`FaultInjector` after the job's recorders, one per run (a new
    :class:`~routelab.run.route.RouteJob` starts counting batches from 0)."""
    current: dict[str, Any] = {"job": None, "injector": None}

    def make(job, shape, router, chunk_dir):
        if current["job"] is not job:
            current["job"], current["injector"] = job, FaultInjector(job.batch_size)
        return [*make_recorders(job, shape, router, chunk_dir), current["injector"]]

    make.with_faults = True
    return make


def install(monkeypatch) -> None:
    """Route jobs run in this process (for the test using ``monkeypatch``) get the injector."""
    from routelab.run import route

    monkeypatch.setattr(route, "make_recorders", with_faults(route.make_recorders))


def patch_module(module) -> None:
    """Give an imported ``routelab.run.route`` module the injector (from sitecustomize)."""
    if not getattr(module.make_recorders, "with_faults", False):
        module.make_recorders = with_faults(module.make_recorders)
