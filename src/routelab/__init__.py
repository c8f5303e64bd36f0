"""routelab: Mixture-of-Experts routing experiments as a reproducible Snakemake pipeline.

The public API, for notebooks and the stage scripts (``docs/api.md`` lists it)::

    from routelab import load_model, moe_shape, build_router, load_null, install_router, Recording

Names are imported on first use, so that ``import routelab`` (and the Snakefile's imports of its
light modules) does not start torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; the one list of the public API.
API: dict[str, str] = {
    # configuration
    "load_config": "routelab.config",
    "routing_configs": "routelab.config",
    "ConfigError": "routelab.config",
    # data
    "load_texts": "routelab.data.loading",
    "prepare_dataset": "routelab.data.prepare",
    "rolling_windows": "routelab.data.windows",
    "prepare_task": "routelab.data.tasks",
    # model
    "load_model": "routelab.model.loading",
    "load_tokenizer": "routelab.model.loading",
    "moe_shape": "routelab.model.families",
    "MoEShape": "routelab.model.families",
    "UnsupportedModelError": "routelab.model.families",
    "install_router": "routelab.model.patching",
    "pin_gpu": "routelab.model.gpus",
    # routing
    "build_router": "routelab.routing.contract",
    "register_router": "routelab.routing.contract",
    "Router": "routelab.routing.contract",
    "Param": "routelab.routing.contract",
    "Selection": "routelab.routing.contract",
    "RouterConfigError": "routelab.routing.contract",
    "ROUTERS": "routelab.routing.contract",
    "fit_null": "routelab.routing.nulls",
    "load_null": "routelab.routing.nulls",
    "register_null": "routelab.routing.nulls",
    "NULL_KINDS": "routelab.routing.nulls",
    # recording
    "Recording": "routelab.record.batch",
    "BatchContext": "routelab.record.batch",
    "Recorder": "routelab.record.batch",
    "RoutingRecorder": "routelab.record.routing_log",
    "DecisionSampler": "routelab.record.decisions",
    "summary_from_state": "routelab.record.statistics",
    # running
    "score_windows": "routelab.run.evaluate",
    "document_scores": "routelab.run.evaluate",
    "quality_metrics": "routelab.run.quality",
    "collect_router_logits": "routelab.run.calibration",
    "generate_routed": "routelab.run.generation",
    "ForwardLog": "routelab.run.generation",
    "evaluate_task": "routelab.run.tasks",
    "RouteJob": "routelab.run.route",
    "run_route": "routelab.run.route",
    # report
    "collect_runs": "routelab.report.aggregate",
    "write_report": "routelab.report.build",
    "draw_run_figures": "routelab.plot.run_figures",
}

__all__ = ["API", "__version__", *API]


def __getattr__(name: str) -> Any:
    if name not in API:
        raise AttributeError(f"module 'routelab' has no attribute {name!r}")
    value = getattr(importlib.import_module(API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
