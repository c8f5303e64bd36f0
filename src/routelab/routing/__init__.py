"""Routing rules, their counting kernels and the nulls p-value rules judge logits against.

:mod:`.contract` (what a router receives, returns and declares; the registry), :mod:`.counting`
(the kernels), :mod:`.rules` (one module per rule, registered on import) and :mod:`.nulls` (the null
kinds). :mod:`routelab.schema` writes the config schema's routing part from these registries.
"""

from routelab.routing import rules  # noqa: F401  (registers every rule)
from routelab.routing.contract import (
    ROUTERS,
    Param,
    Router,
    RouterConfigError,
    Selection,
    build_router,
    pvalues_at_layers,
    register_router,
    router_class,
)
from routelab.routing.rules.bh import BHRouter
from routelab.routing.rules.hc import HCRouter
from routelab.routing.rules.pvalue import PValueRouter
from routelab.routing.rules.topk import TopKRouter
from routelab.routing.rules.topp import TopPRouter

__all__ = ["ROUTERS", "BHRouter", "HCRouter", "PValueRouter", "Param", "Router", "RouterConfigError", "Selection",
           "TopKRouter", "TopPRouter", "build_router", "pvalues_at_layers", "register_router", "router_class"]
