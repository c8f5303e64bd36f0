"""What every null kind shares: the interface routers use, the registry of kinds, saving and loading.

A null is the distribution router logits are judged against: ``pvalues(logits [tokens, experts],
layer, temperature) -> float32 [tokens, experts] in (0, 1]`` on the logits' device. Each kind
registers a :class:`NullKind` (its name, one-line description, whether ``calibrate_null`` fits it,
how to fit and load it) with :func:`register_null`; :func:`fit_null` and :func:`load_null` go through
the registry, and the config schema's ``null_model`` choices come from it.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from routelab.io.files import atomic_path


class NullMismatchError(ValueError):
    """A null fitted for a different model (layer or expert count differs)."""


class Null:
    """The interface of every null kind; subclasses implement :meth:`pvalues` and :meth:`save`.

    ``monotone_in_logit``: p never rises with the logit, the same for every token and expert (sorting a
    token's logits sorts its p-values). ``pointwise_in_logit``: moreover p is one function of the logit
    per layer, so ``p <= c`` is ``logit >= x(c)`` for a cut found once per layer. Routers take the
    shortcuts these allow.
    """

    kind: str
    num_experts: int | None
    meta: dict[str, Any]
    monotone_in_logit: ClassVar[bool] = False
    pointwise_in_logit: ClassVar[bool] = False

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Refuse to route a model this null was not fitted for."""
        raise NotImplementedError

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def pvalues_layers(self, logits: torch.Tensor, layers: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
        """:meth:`pvalues` of several layers, ``logits`` ``[len(layers), tokens, experts]`` (slice ``i``
        against layer ``layers[i]``); kinds that can do better in one call override it."""
        return torch.stack([self.pvalues(part, layer, temperature) for part, layer in zip(logits, layers)])

    def save(self, path: str | os.PathLike) -> None:
        raise NotImplementedError


class TabulatedCurves(Null):
    """The members the calibrated kinds share: survival-function tables ``grid`` / ``sf`` whose first
    axis is the MoE layer (subclasses are dataclasses with those fields, ``min_pvalue`` and ``meta``)."""

    grid: np.ndarray
    sf: np.ndarray
    _device_cache: dict

    @property
    def num_layers(self) -> int:
        return int(self.grid.shape[0])

    def check_model(self, num_layers: int, num_experts: int) -> None:
        check_counts((self.num_layers, self.num_experts), self.meta.get("model", "?"), num_layers, num_experts)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 copies of the tables on ``device``, made once per device (routing calls this per layer).

        ``sf`` is made non-increasing along its last axis (a running minimum: a survival function cannot
        rise; a table whose float rounding made it rise by a hair is read as flat there), so p never rises
        with the logit.
        """
        key = str(device)
        if key not in self._device_cache:
            sf = np.minimum.accumulate(np.asarray(self.sf, dtype=np.float32), axis=-1)
            self._device_cache[key] = (torch.as_tensor(self.grid, dtype=torch.float32, device=device).contiguous(),
                                       torch.as_tensor(sf, dtype=torch.float32, device=device).contiguous())
        return self._device_cache[key]


def check_counts(fitted: tuple[int, int], model_name: str, num_layers: int, num_experts: int) -> None:
    if (num_layers, num_experts) != fitted:
        raise NullMismatchError(
            f"null: fitted for {fitted[0]} MoE layers x {fitted[1]} experts (model {model_name!r}) but the "
            f"model has {num_layers} x {num_experts}; rerun calibrate_null for this model"
        )


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


@dataclass(frozen=True)
class NullKind:
    """One kind of null as the pipeline knows it.

    ``fit(layer_logits, num_experts, size, meta)`` fits it from per-layer calibration logits (``size``:
    the table size, the ``calibration.grid_size`` config key; ``table_option`` names what it means for
    this kind); ``load(fields)`` builds it from the arrays of its saved ``.npz``. ``calibrated`` kinds are
    fitted by the ``calibrate_null`` job; the others are built without calibration data.
    """

    name: str
    description: str
    calibrated: bool
    fit: Callable[[list[np.ndarray] | None, int, int, dict[str, Any]], Null]
    load: Callable[[dict[str, np.ndarray]], Null]
    table_option: str | None = None


NULL_KINDS: dict[str, NullKind] = {}


def register_null(kind: NullKind) -> NullKind:
    if kind.name in NULL_KINDS:
        raise ValueError(f"null kind {kind.name!r} is registered twice")
    NULL_KINDS[kind.name] = kind
    return kind


def calibrated_kinds() -> tuple[str, ...]:
    return tuple(name for name, kind in NULL_KINDS.items() if kind.calibrated)


def fit_null(method: str, layer_logits: list[np.ndarray] | None, num_experts: int, *, grid_size: int = 2048,
             quantiles: int = 4096, meta: dict[str, Any] | None = None) -> Null:
    """Fit the null ``method`` names (a registered kind) from per-layer calibration logits.

    ``grid_size`` applies to kde, ``quantiles`` to empirical and per_expert; gaussian ignores
    ``layer_logits`` (pass None) and is built for ``num_experts``.
    """
    if method not in NULL_KINDS:
        raise ValueError(f"null method: {method!r} is not a null; choose one of {', '.join(NULL_KINDS)}")
    kind = NULL_KINDS[method]
    size = {"grid_size": grid_size, "quantiles": quantiles}.get(kind.table_option)
    return kind.fit(layer_logits, num_experts, size, meta or {})


def load_null(path: str | os.PathLike) -> Null:
    """Read a null of any kind saved by ``save``. A file without ``kind`` (older kde nulls) reads as kde."""
    path = Path(path)
    valid = f"valid kinds: {', '.join(NULL_KINDS)}"
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable null .npz ({exc}); {valid}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not a null .npz with a 'kind' field; {valid}")
    with data:
        try:
            fields = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: corrupt null .npz ({exc}); {valid}") from None
    kind = str(fields["kind"]) if "kind" in fields else "kde"
    if kind not in NULL_KINDS:
        raise ValueError(f"{path}: unknown null kind {kind!r}; {valid}")
    try:
        return NULL_KINDS[kind].load(fields)
    except KeyError as exc:
        raise ValueError(f"{path}: corrupt {kind!r} null, field {exc} is missing; {valid}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: corrupt {kind!r} null ({exc}); {valid}") from None


def meta_of(fields: dict[str, np.ndarray]) -> dict[str, Any]:
    return json.loads(str(fields["meta"]))


def check_table_shapes(fields: dict[str, np.ndarray], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """A saved null's ``grid`` and ``sf``, checked to be equal ``ndim``-D shapes with at least 2 points."""
    grid, sf = fields["grid"], fields["sf"]
    if grid.ndim != ndim or grid.shape != sf.shape or grid.shape[-1] < 2:
        raise ValueError(f"grid {grid.shape} and sf {sf.shape} must be equal {ndim}-D shapes with >= 2 points")
    return grid, sf


def layer_values(layer: int, values: Any, num_experts: int) -> np.ndarray:
    """One layer's calibration logits as float64, checked: finite, and ``[tokens, num_experts]`` if 2-D."""
    array = np.asarray(values, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"calibration logits of layer {layer}: {bad} of {array.size} values are NaN or "
                         "infinite; check the model dtype (overflow) and the calibration inputs")
    if array.ndim == 2 and array.shape[1] != num_experts:
        raise ValueError(f"calibration logits of layer {layer}: shape {list(array.shape)} but num_experts is "
                         f"{num_experts}; valid: [tokens, {num_experts}]")
    if array.size < 2:
        raise ValueError(f"calibration logits of layer {layer}: {array.size} values; need at least 2")
    return array


def non_empty(layer_logits: list[np.ndarray]) -> list[np.ndarray]:
    if layer_logits is None or len(layer_logits) == 0:
        raise ValueError("calibration logits: no layers; need one array of logits per MoE layer")
    return list(layer_logits)


def check_quantiles(quantiles: int) -> None:
    if quantiles < 2:
        raise ValueError(f"quantiles: {quantiles!r} is too small; valid: an integer >= 2 (e.g. 4096)")
