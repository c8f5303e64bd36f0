"""How a rule's alternative parameters resolve, and when a rule is fitted to the calibration split.

Pure Python on parameter dicts, so the config checks the Snakefile runs (``routelab.config``, no torch)
and the routers' own checks (``routelab.routing.contract``) share one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def choose_alternative(values: dict[str, Any], keys: Sequence[str], default: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` with at most one of ``keys`` set (a rule's alternative parameters, e.g. ratio's beta or
    calibrate): two given raise ``ValueError`` naming them; none given takes ``default`` (empty: the rule
    documents what none means; None: one must be given)."""
    given = [key for key in keys if values.get(key) is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(f'{key}={values[key]!r}' for key in given)} given; give only one of "
                         f"{', '.join(keys)}")
    if not given and default is None:
        raise ValueError(f"none of {', '.join(keys)} given; give exactly one of them")
    return values if given else {**values, **default}


def calibration_needed(values: dict[str, Any], calibrated: Sequence[str],
                       alternatives: Sequence[tuple[Sequence[str], dict[str, Any] | None]]) -> bool:
    """Whether a rule's resolved parameter ``values`` fit it to the calibration split: a ``calibrated``
    parameter is given, or a group of alternatives holding one has none given and an empty default (then the
    rule's own calibrated default applies, as entropy's evenly spaced quantiles)."""
    if any(values.get(key) is not None for key in calibrated):
        return True
    return any(default == {} and set(keys) & set(calibrated) and all(values.get(key) is None for key in keys)
               for keys, default in alternatives)
