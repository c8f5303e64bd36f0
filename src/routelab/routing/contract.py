"""The router contract: what a routing rule receives and returns, what it declares, and the registry.

A router maps one MoE layer's router logits ``[tokens, experts]`` to a :class:`Selection`:
``indices`` and ``weights`` of shape ``[tokens, max_k]`` whose first ``k[t]`` slots hold token ``t``'s
experts (most preferred first) and whose unused slots hold the sentinel index ``num_experts`` with
weight 0. Pure tensor code: no Python loop over tokens, any device, any floating dtype.

What a rule ranks (``logits``, the family's selection score: the router logits of softmax families,
``sigmoid(logit) + bias`` of DeepSeek-V3-class ones, ``-inf`` outside a group-limited family's candidate
experts), the probabilities probability-based rules count on (``probs``) and the scores the selected
experts are mixed with (``mixing``, default ``probs``) are separate inputs; the model families module
computes them. The ``weights`` policy says what happens to the selected experts' mixing scores:
``model`` renormalises them over the selected experts exactly when the model's ``norm_topk_prob`` says
so (OLMoE-1B-7B: no), ``renormalize`` always does, ``none`` never does; a family's :class:`Mixing` adds
its epsilon, floor and scaling factor.

Logits must be finite: a call whose logits contain NaN or +-inf raises ``ValueError`` naming the
layer and how many tokens are affected, instead of routing those tokens on garbage.

A rule is a :class:`Router` subclass (one module in :mod:`routelab.routing.rules`) that declares its
``method`` name and its :class:`Param` list; :func:`register_router` adds it to :data:`ROUTERS`.
:func:`build_router`, the config defaults and the routing part of the config schema
(``workflow/schemas/routing.schema.yaml``, written by :mod:`routelab.schema`) follow from
those declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from routelab.choices import calibration_needed, choose_alternative

WEIGHT_POLICIES = ("model", "renormalize", "none")


class RouterConfigError(ValueError):
    """Router parameters that cannot work for this model."""


class PValueNull(Protocol):
    """What a p-value router needs of a null (every kind in :mod:`routelab.routing.nulls` has it)."""

    kind: str
    num_experts: int | None  # None: fits any expert count
    monotone_in_logit: bool  # p never rises with the logit, for every token and expert alike
    pointwise_in_logit: bool  # p is one function of the logit per layer (no per-token or per-expert part)

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        """``[tokens, experts]`` float32 p-values in (0, 1] on the logits' device."""

    def pvalues_layers(self, logits: torch.Tensor, layers: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
        """:meth:`pvalues` of several layers at once: ``logits`` ``[len(layers), tokens, experts]``."""


PValues = torch.Tensor | Callable[[torch.Tensor | None], torch.Tensor] | None


class Selection:
    """One layer's routing decisions for a batch of tokens.

    ``indices`` ``[tokens, max_k]`` int64 (sentinel ``num_experts`` in unused slots), ``weights``
    ``[tokens, max_k]`` (0 in unused slots), ``k`` ``[tokens]`` int64 (experts selected per token) and,
    for p-value routers, ``pvalues`` ``[tokens, experts]`` float32. ``pvalues`` may be given as a
    function of the token rows (a 1-D index tensor, or None for all) that computes them: a router that
    selected without them then pays for them only if a recorder reads them, and only for the rows it
    reads (:meth:`pvalues_at`; :class:`routelab.record.BatchContext` asks once per batch for all
    recorders).

    For recorders, optionally: ``probs`` ``[tokens, experts]`` float32, the expert probabilities the
    weights were taken from; and, from a router whose preference order is descending probability,
    ``top_expert`` ``[tokens]`` (the most probable expert) and ``top_probs`` ``[tokens, 2]`` (the two
    largest probabilities, whatever k is), so statistics need no index reduction over all experts.

    Set by :func:`routelab.model.install_router` for families whose scores are not the softmax of their
    router logits (else None): ``scores`` ``[tokens, experts]``, the selection scores before any candidate
    mask (what calibration fits nulls on), and ``softmax_logits`` ``[tokens, experts]`` float32, logits
    whose softmax is ``probs`` (what the routing log's probability statistics are computed from).
    """

    __slots__ = ("indices", "weights", "k", "_pvalues", "probs", "top_expert", "top_probs", "scores",
                 "softmax_logits")

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, pvalues: PValues = None,
                 probs: torch.Tensor | None = None, top_expert: torch.Tensor | None = None,
                 top_probs: torch.Tensor | None = None):
        self.indices, self.weights, self.k, self._pvalues, self.probs = indices, weights, k, pvalues, probs
        self.top_expert, self.top_probs = top_expert, top_probs
        self.scores: torch.Tensor | None = None
        self.softmax_logits: torch.Tensor | None = None

    @property
    def pvalues(self) -> torch.Tensor | None:
        """All tokens' p-values ``[tokens, experts]`` (computed on first read), None without p-values."""
        if callable(self._pvalues):
            self._pvalues = self._pvalues(None)
        return self._pvalues

    @property
    def has_pvalues(self) -> bool:
        return self._pvalues is not None

    @property
    def lazy_pvalues(self) -> LayerPValues | None:
        """The p-values still to compute (a :class:`LayerPValues`), None once computed or without any."""
        return self._pvalues if isinstance(self._pvalues, LayerPValues) else None

    def pvalues_at(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The p-values of the token rows ``rows`` (1-D int64 on the selection's device), ``[len(rows),
        experts]``; computes only those rows unless all were computed already. None without p-values."""
        if callable(self._pvalues):
            return self._pvalues(rows)
        return None if self._pvalues is None else self._pvalues.index_select(0, rows)

    @classmethod
    def cat(cls, parts: Sequence[Selection]) -> Selection:
        """One layer's selections of consecutive batches as one (their tokens in order): what
        :class:`routelab.record.Recording` hands on for a group of decode steps. Optional fields are kept
        where every part has them; p-values still to compute stay lazy when one call computes them all."""
        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if any(value is None for value in values) else torch.cat(values)

        lazy = [part.lazy_pvalues for part in parts]
        if all(p is not None and p.computes_with(lazy[0]) and p.layer == lazy[0].layer for p in lazy):
            pvalues: PValues = LayerPValues(lazy[0].null, torch.cat([p.logits for p in lazy]), lazy[0].layer,
                                            lazy[0].temperature)
        elif all(part.has_pvalues for part in parts):
            pvalues = torch.cat([part.pvalues for part in parts])
        else:
            pvalues = None
        merged = cls(indices=joined("indices"), weights=joined("weights"), k=joined("k"), pvalues=pvalues,
                     probs=joined("probs"), top_expert=joined("top_expert"), top_probs=joined("top_probs"))
        merged.scores, merged.softmax_logits = joined("scores"), joined("softmax_logits")
        return merged

    def __repr__(self) -> str:
        return f"Selection(tokens={self.k.shape[0]}, max_k={self.indices.shape[-1]})"


class LayerPValues:
    """One layer's p-values, computed when read: a p-value router's lazy :attr:`Selection.pvalues`.
    Called with ``rows`` (1-D int64), the p-values of those token rows only; with None, of all tokens.
    :func:`pvalues_at_layers` computes several layers' at once."""

    __slots__ = ("null", "logits", "layer", "temperature")

    def __init__(self, null: PValueNull, logits: torch.Tensor, layer: int, temperature: float):
        self.null, self.logits, self.layer, self.temperature = null, logits, layer, temperature

    def __call__(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits if rows is None else self.logits.index_select(0, rows)
        return self.null.pvalues(logits, self.layer, self.temperature)

    def computes_with(self, other: LayerPValues) -> bool:
        """Whether one ``pvalues_layers`` call of the null can compute both layers' p-values."""
        return (self.null is other.null and self.temperature == other.temperature
                and self.logits.dtype == other.logits.dtype and self.logits.device == other.logits.device)


def pvalues_at_layers(selections: Sequence[Selection], rows: torch.Tensor) -> torch.Tensor | None:
    """``[len(selections), len(rows), experts]``: :meth:`Selection.pvalues_at` of each selection (one per
    layer of a forward pass), None if any has no p-values.

    The layers whose p-values are still to compute against one null are computed in one call of its
    ``pvalues_layers`` (one call instead of one per layer: recorders ask for a few sampled tokens of
    every layer, where a call per layer costs more than the arithmetic); the values are the same.
    """
    if not all(s.has_pvalues for s in selections):
        return None
    pending = [s.lazy_pvalues for s in selections if s.lazy_pvalues is not None]
    if len(pending) > 1 and len(pending) == len(selections) and all(p.computes_with(pending[0]) for p in pending):
        logits = torch.stack([p.logits.index_select(0, rows) for p in pending])
        return pending[0].null.pvalues_layers(logits, [p.layer for p in pending], pending[0].temperature)
    return torch.stack([s.pvalues_at(rows) for s in selections])


def nonfinite_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Number of tokens (rows of ``logits`` ``[tokens, experts]``) with a NaN or infinite logit; 0-d int64."""
    return (~torch.isfinite(logits)).any(dim=-1).sum()


def raise_nonfinite(layer: int, bad: int, tokens: int) -> None:
    """The error for ``bad`` of ``tokens`` tokens with NaN or infinite router logits in ``layer``."""
    raise ValueError(
        f"logits of layer {layer}: {bad} of {tokens} tokens have NaN or infinite router logits; "
        "routers need finite logits (look for overflow in the model's dtype or a broken checkpoint)"
    )


def check_finite_logits(logits: torch.Tensor, layer: int) -> None:
    """Raise ``ValueError`` if any logit is NaN or infinite.

    A NaN or infinity anywhere makes the sum non-finite, so one cheap reduction clears the usual case;
    only a non-finite sum (or finite logits so large that their sum overflows) counts the bad tokens.
    """
    if bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        return
    bad = int(nonfinite_tokens(logits))
    if bad:
        raise_nonfinite(layer, bad, logits.shape[0])


def same_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` for every token of ``logits`` ``[tokens, experts]``: ``[tokens]`` int64 on their device."""
    return torch.full(logits.shape[:1], k, dtype=torch.long, device=logits.device)


def softmax_float32(logits: torch.Tensor) -> torch.Tensor:
    """Expert probabilities ``[tokens, experts]``: softmax over experts in float32, as native routers."""
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


@dataclass(frozen=True)
class Mixing:
    """How a family turns the selected experts' mixing scores into the weights the experts are mixed with.

    Renormalised (when the ``weights`` policy says so) as ``w / (max(sum w, floor) + eps)``, then times
    ``scale`` (DeepSeek-V3's ``routed_scaling_factor``); ``eps`` and ``floor`` are the family's own
    (DeepSeek-V3: eps 1e-20; LFM2: eps 1e-6; ERNIE 4.5: floor ``moe_norm_min``), so the weights are
    computed with the native operations.
    """

    eps: float = 0.0
    floor: float | None = None
    scale: float = 1.0

    def renormalize(self, weights: torch.Tensor) -> torch.Tensor:
        total = weights.sum(dim=-1, keepdim=True)
        if self.floor is not None:
            total = total.clamp(min=self.floor)
        return weights / (total + self.eps if self.eps else total)

    def scaled(self, weights: torch.Tensor) -> torch.Tensor:
        return weights if self.scale == 1.0 else weights * self.scale


SOFTMAX_MIXING = Mixing()


@dataclass(frozen=True)
class Param:
    """One configurable parameter of a router: the single place its name, type, default, valid range
    and meaning are written. The config schema, the config defaults, :func:`build_router` and the
    router's own checks are derived from it.

    ``default`` None with ``model_top_k`` set means "the model's own top-k" (resolved when the router is
    built for a model). ``router_arg`` False marks a config parameter the router does not take itself
    (``null_model`` chooses the null the router is given). ``attribute`` names the router attribute that
    holds the value (default: the name) for :meth:`Router.describe`.

    ``type`` ``list`` declares a list of ``item_type`` numbers (the range applies to every item).
    ``calibrated``: a value given for this parameter asks the router to fit something to the calibration
    split's router logits (the route job then depends on them; see :func:`uses_calibration`).
    ``expert_count``: the value (every item of a list) counts experts per token, so it can be at most the
    model's experts; the config check holds it against the model's expert count before any job runs.
    """

    name: str
    type: type
    default: Any
    description: str
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    model_top_k: bool = False
    router_arg: bool = True
    attribute: str | None = None
    item_type: type | None = None
    calibrated: bool = False
    expert_count: bool = False

    def valid(self) -> str:
        """The valid values as text, e.g. ``0 < alpha <= 1`` or ``one of model, renormalize, none``."""
        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        if self.type is list:
            items = "integers" if self.item_type is int else "numbers"
            bounds = self._bounds("each")
            return f"a non-empty list of {items}" + (f", {bounds}" if bounds else "")
        return self._bounds(self.name) or self.name

    def _bounds(self, name: str) -> str:
        if self.exclusive_minimum is not None:
            bound, low_sign, high_sign = self.exclusive_minimum, "<", ">"
        elif self.minimum is not None:
            bound, low_sign, high_sign = self.minimum, "<=", ">="
        else:
            bound = None
        if self.maximum is None:  # "temperature > 0" reads better than "0 < temperature"
            return "" if bound is None else f"{name} {high_sign} {_number(bound)}"
        low = "" if bound is None else f"{_number(bound)} {low_sign} "
        return f"{low}{name} <= {_number(self.maximum)}"

    def check(self, value: Any) -> Any:
        """``value`` converted to :attr:`type` if valid, else a :class:`RouterConfigError` naming the key,
        the value and what is valid. Integers' upper bounds depend on the model and are checked by the
        router itself."""
        if self.choices is not None:
            if value not in self.choices:
                raise RouterConfigError(f"{self.name}: {value!r} is not valid; choose one of {', '.join(self.choices)}")
            return value
        if self.type is list:
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(self._number_in_range(item, self.item_type) for item in value)):
                raise RouterConfigError(f"{self.name}: {value!r} is not valid; valid: {self.valid()}")
            return [self.item_type(item) for item in value]
        if not self._number_in_range(value, self.type):
            raise RouterConfigError(f"{self.name}: {value!r} is out of range; valid: {self.valid()}")
        return self.type(value)

    def _number_in_range(self, value: Any, kind: type) -> bool:
        number = Integral if kind is int else Real
        return not isinstance(value, bool) and isinstance(value, number) and self._in_range(value)

    def _in_range(self, value: float) -> bool:
        return ((self.minimum is None or value >= self.minimum)
                and (self.exclusive_minimum is None or value > self.exclusive_minimum)
                and (self.maximum is None or value <= self.maximum))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# Parameters several rules share: declared once, listed by each rule that takes them.
MIN_K = Param("min_k", int, 1, "fewest experts per token (the clamp's floor)", minimum=1, expert_count=True)
MAX_K = Param("max_k", int, None, "most experts per token (the clamp's ceiling); null = the model's top-k",
              minimum=1, model_top_k=True, expert_count=True)
WEIGHTS = Param("weights", str, "model",
                "model = renormalise the selected weights iff the model's norm_topk_prob is set; renormalize = "
                "always make the selected weights sum to 1; none = raw softmax probabilities",
                choices=WEIGHT_POLICIES, attribute="weight_policy")


@dataclass(frozen=True)
class Alternatives:
    """Parameters of which at most one is given (``ratio``: ``beta`` or ``calibrate``); ``default`` is
    what a config that gives none of them means (empty: the rule documents it; None: one must be
    given). Each member's own default is None."""

    keys: tuple[str, ...]
    default: dict[str, Any] | None


class Router:
    """Base class: subclasses declare ``method`` and ``params`` and implement :meth:`rank`.

    ``summary`` is the one-line description the schema and the docs show. ``needs_null``: the router
    takes a null (its constructor's second argument) and offers p-values; ``bh_level`` is the BH level
    its decisions are made at, None for rules that are not BH (the sampled detail log's thresholds).
    ``alternatives``: groups of parameters of which at most one is given. ``teacher_forced``: the rule
    looks at every token of a window at once, so it cannot route a decode step (generation).
    A router given calibration logits (:func:`uses_calibration`) takes them as its ``calibration``
    argument: one ``[tokens, experts]`` array per MoE layer.
    """

    method: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    needs_null: ClassVar[bool] = False
    alternatives: ClassVar[tuple[Alternatives, ...]] = ()
    teacher_forced: ClassVar[bool] = False

    def __init__(self, num_experts: int, max_k: int, min_k: int = 1, weights: str = "model"):
        self.weight_policy = WEIGHTS.check(weights)
        for key, value in (("min_k", min_k), ("max_k", max_k)):
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise RouterConfigError(f"{key}: {value!r} is not valid; need an integer in 1..{num_experts}")
        if not 1 <= min_k:
            raise RouterConfigError(f"min_k: {min_k} is not valid; need min_k >= 1")
        if min_k > max_k:
            raise RouterConfigError(f"min_k: {min_k} is greater than max_k = {max_k}; need min_k <= max_k")
        if max_k > num_experts:
            raise RouterConfigError(f"max_k: {max_k} exceeds the model's {num_experts} experts; "
                                    f"need max_k <= {num_experts}")
        self.num_experts, self.max_k, self.min_k = num_experts, int(max_k), int(min_k)

    @property
    def bh_level(self) -> float | None:
        return None

    def rank(self, logits: torch.Tensor, layer: int,
             probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, PValues]:
        """Return ``(order [tokens, max_k], k [tokens], pvalues)``; ``order`` most preferred first.

        ``probs`` are the expert probabilities :meth:`__call__` already computed (None: compute them).
        ``pvalues`` is None for routers without p-values, else a ``[tokens, experts]`` tensor or a function
        returning it (see :class:`Selection`).
        """
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, layer: int = 0, norm_topk_prob: bool = False,
                 probs: torch.Tensor | None = None, check_finite: bool = True, *,
                 mixing_scores: torch.Tensor | None = None, mixing: Mixing = SOFTMAX_MIXING,
                 probability_order: bool = True) -> Selection:
        """Select experts for ``logits`` ``[tokens, experts]`` (the selection scores) of MoE layer ``layer``.

        ``probs`` ``[tokens, experts]`` are the probabilities probability-based rules count on; default
        the softmax of the logits in float32 (model families that score experts otherwise pass their
        own). The weights are the selected experts' ``mixing_scores`` (default ``probs``) under the
        ``weights`` policy and ``mixing``. ``probability_order``: ranking by ``logits`` is ranking by
        ``probs`` (False where a selection bias reorders them), so the first two slots may stand for the
        two most probable experts.
        Raises ``ValueError`` if any logit is NaN or infinite, unless ``check_finite`` is False (the
        caller checks them itself, as :func:`routelab.model.install_router` does on the raw router logits,
        on accelerators once per forward instead of once per layer).
        """
        if logits.dim() != 2 or logits.shape[-1] != self.num_experts:
            raise ValueError(f"logits: expected shape [tokens, {self.num_experts}], got {tuple(logits.shape)}")
        if check_finite:
            check_finite_logits(logits, layer)
        if probs is None:
            probs = softmax_float32(logits)
        order, k, pvalues = self.rank(logits, layer, probs)
        weights = (probs if mixing_scores is None else mixing_scores).gather(-1, order)
        top = {}
        if self.max_k >= 2 and probability_order and self.orders_by_probability():
            # the first two slots are the two most probable experts
            top = {"top_expert": order[:, 0], "top_probs": weights[:, :2] if mixing_scores is None
                   else probs.gather(-1, order[:, :2])}
        if self.min_k == self.max_k:  # every slot used: no sentinel to write
            indices = order
        else:
            used = torch.arange(self.max_k, device=logits.device) < k.unsqueeze(-1)
            weights = weights * used
            indices = order.masked_fill(~used, self.num_experts)
        if self.weight_policy == "renormalize" or (self.weight_policy == "model" and norm_topk_prob):
            weights = mixing.renormalize(weights)
        weights = mixing.scaled(weights)
        return Selection(indices=indices, weights=weights, k=k, pvalues=pvalues, probs=probs, **top)

    def check_layers(self, num_layers: int) -> None:
        """Refuse a model whose MoE layer count this router was not set up for (per-layer rules)."""

    def begin_forward(self, sequences: int, length: int, attention_mask: torch.Tensor | None, cached: int) -> None:
        """Called by :func:`routelab.model.install_router` before each forward of the model: ``sequences`` x
        ``length`` tokens (flattened in that order in the logits the layers see), their attention mask
        (None: all real) and the number of tokens already in the KV cache (> 0: a decode step)."""

    def orders_by_probability(self) -> bool:
        """Whether :meth:`rank` orders experts by descending probability (ties aside): then the first
        two slots of the order are the two most probable experts. Routers that order otherwise say no."""
        return True

    def describe(self) -> dict[str, Any]:
        """``{"method": ..., param: value, ...}``: the value of every declared parameter, in declaration
        order, as this router resolved it (the model's top-k filled in)."""
        return {"method": self.method, **{p.name: getattr(self, p.attribute or p.name) for p in self.params}}

    @classmethod
    def resolve(cls, spec: dict[str, Any]) -> dict[str, Any]:
        """The values of this rule's parameters in ``spec`` (a routing config), declared defaults filled in;
        a key that is not a parameter raises naming it and the valid ones."""
        names = [p.name for p in cls.params]
        for key in spec:
            if key not in ("name", "method") and key not in names:
                raise RouterConfigError(f"{key}: {spec[key]!r} given, but {key!r} is not a parameter of method "
                                        f"{cls.method!r}; valid: {', '.join(names)}")
        values = {p.name: spec.get(p.name, p.default) for p in cls.params}
        for group in cls.alternatives:
            try:
                values = choose_alternative(values, group.keys, group.default)
            except ValueError as exc:
                raise RouterConfigError(f"method {cls.method!r}: {exc}") from None
        return values

    @classmethod
    def check_values(cls, values: dict[str, Any]) -> None:
        """Check every parameter value of ``values`` (as :meth:`resolve` returns them) against its declared
        type and range before a model is loaded; bounds that depend on the model are checked when the
        router is built."""
        for param in cls.params:
            if values[param.name] is not None or param.default is not None and not param.model_top_k:
                param.check(values[param.name])

    @classmethod
    def uses_calibration(cls, values: dict[str, Any]) -> bool:
        """Whether the router :meth:`resolve` made of ``values`` fits something to calibration logits."""
        return calibration_needed(values, [p.name for p in cls.params if p.calibrated],
                                  [(group.keys, group.default) for group in cls.alternatives])


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: add a :class:`Router` subclass to :data:`ROUTERS` under its ``method``."""
    if cls.method in ROUTERS and ROUTERS[cls.method] is not cls:
        raise ValueError(f"router method {cls.method!r} is registered twice ({ROUTERS[cls.method].__name__}, "
                         f"{cls.__name__})")
    names = [p.name for p in cls.params]
    assert len(set(names)) == len(names), f"{cls.__name__}: a parameter is declared twice"
    ROUTERS[cls.method] = cls
    return cls


def router_class(method: str) -> type[Router]:
    """The registered rule ``method``, or a :class:`RouterConfigError` listing the registered ones."""
    if method not in ROUTERS:
        raise RouterConfigError(f"method: {method!r} is not a router; choose one of {', '.join(ROUTERS)}")
    return ROUTERS[method]


def build_router(spec: dict[str, Any], num_experts: int, model_top_k: int, null: PValueNull | None = None,
                 calibration: Sequence[np.ndarray] | None = None) -> Router:
    """The router a routing config ``spec`` (``{"method": ..., params}``; missing parameters take their
    defaults) describes, for a model with ``num_experts`` experts and top-``model_top_k`` routing.

    ``k`` / ``max_k`` left at None mean the model's own top-k (so an adaptive router never uses more
    experts per token than the model was trained with unless asked to). Rules that need a null get
    ``null`` (see :mod:`routelab.routing.nulls`); rules set up from the calibration split
    (:meth:`Router.uses_calibration`) get ``calibration``, one ``[tokens, experts]`` array of router
    logits per MoE layer (``routelab.run.calibration.load_router_logits``).
    """
    cls = router_class(spec["method"])
    values = cls.resolve(spec)
    arguments = {p.name: (model_top_k if p.model_top_k and values[p.name] is None else values[p.name])
                 for p in cls.params if p.router_arg}
    if cls.uses_calibration(values):
        if calibration is None:
            raise RouterConfigError(f"method {cls.method!r} as configured fits itself to the calibration split's "
                                    "router logits; none were given (run collect_router_logits first)")
        arguments["calibration"] = calibration
    if not cls.needs_null:
        return cls(num_experts, **arguments)
    if null is None:
        raise RouterConfigError(f"method {cls.method!r} needs a calibrated null; run calibrate_null first")
    return cls(num_experts, null, **arguments)
