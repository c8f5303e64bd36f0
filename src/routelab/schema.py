"""The routing part of the config schema, generated from the registered rules, null kinds and kernels.

``workflow/schemas/routing.schema.yaml`` is this module's output (``python -m routelab.schema``
writes it; ``--check`` fails when the file differs, as a test does): the config's ``routing`` entries
and ``routing_grid`` entries, one branch per rule with its parameters' types, ranges, defaults and
descriptions, and the null kinds. The Snakefile validates against it without importing torch, and
:mod:`routelab.config` reads the defaults from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from routelab.model.experts import SUPPORTED_KERNELS
from routelab.routing.contract import ROUTERS, Param
from routelab.routing.nulls import NULL_KINDS, calibrated_kinds

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "routing.schema.yaml"
HEADER = ("# Generated from the routing rules, null kinds and experts kernels by `python -m routelab.schema`;\n"
          "# do not edit. Referenced by config.schema.yaml (routing, routing_grid, model.experts_implementation).\n")
NAME = {"type": "string", "minLength": 1, "description": "used in file paths; letters, digits and _ . + - only"}


def param_schema(param: Param) -> dict[str, Any]:
    """JSON schema of one parameter's value (``null`` allowed where it means the model's top-k)."""
    kinds = {int: "integer", float: "number", str: "string", list: "array"}
    kind = kinds[param.type]
    optional = param.model_top_k or param.default is None  # null: the model's top-k, or not given
    schema: dict[str, Any] = {"type": [kind, "null"] if optional else kind}
    if param.choices is not None:
        schema["enum"] = [*param.choices, None] if optional else list(param.choices)
    bounds: dict[str, Any] = {}
    for key, value in (("minimum", param.minimum), ("exclusiveMinimum", param.exclusive_minimum),
                       ("maximum", param.maximum)):
        if value is not None:
            bounds[key] = value
    if param.type is list:
        schema["minItems"] = 1
        schema["items"] = {"type": kinds[param.item_type], **bounds}
    else:
        schema.update(bounds)
    schema["default"] = param.default
    schema["description"] = param.description
    return schema


def _swept(schema: dict[str, Any]) -> dict[str, Any]:
    """A grid entry's value: one value, or a list of them to sweep (no default: expanded entries get it).
    A list-valued parameter's sweep is a list of lists (``routelab.config.expand_grid`` tells them apart)."""
    one = {key: value for key, value in schema.items() if key not in ("default", "description")}
    return {"anyOf": [one, {"type": "array", "minItems": 1, "items": one}], "description": schema["description"]}


def method_schema(method: str, grid: bool) -> dict[str, Any]:
    """The schema of one rule's entry: ``name``, ``method`` and exactly its parameters.

    ``x-alternatives`` (groups of parameters of which at most one is given, with what none means),
    ``x-calibrated`` (parameters that fit the rule to the calibration split), ``x-expert-counts``
    (parameters that count experts per token) and ``x-teacher-forced`` are read by :mod:`routelab.config`;
    JSON-schema validators ignore them.
    """
    cls = ROUTERS[method]
    properties: dict[str, Any] = {"name": NAME, "method": {"const": method}}
    for param in cls.params:
        properties[param.name] = _swept(param_schema(param)) if grid else param_schema(param)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "method"],
              "properties": properties}
    if cls.alternatives:
        schema["x-alternatives"] = [{"keys": list(group.keys),
                                     "default": None if group.default is None else dict(group.default)}
                                    for group in cls.alternatives]
    calibrated = [param.name for param in cls.params if param.calibrated]
    if calibrated:
        schema["x-calibrated"] = calibrated
    counts = [param.name for param in cls.params if param.expert_count]
    if counts:
        schema["x-expert-counts"] = counts
    if cls.teacher_forced:
        schema["x-teacher-forced"] = True
    return schema


def _entry(grid: bool) -> dict[str, Any]:
    method = {"type": "string", "enum": list(ROUTERS),
              "description": "routing rule: " + "; ".join(f"{m} = {cls.summary}" for m, cls in ROUTERS.items())}
    suffix = "_grid" if grid else ""
    return {"type": "object", "required": ["name", "method"], "properties": {"name": NAME, "method": method},
            "allOf": [{"if": {"required": ["method"], "properties": {"method": {"const": m}}},
                       "then": {"$ref": f"#/$defs/{m}{suffix}"}} for m in ROUTERS]}


def routing_schema() -> dict[str, Any]:
    """The whole generated schema document."""
    defs: dict[str, Any] = {
        "routing": _entry(grid=False),
        "routing_grid": {**_entry(grid=True), "description": (
            "each entry expands to the cartesian product of its list-valued keys; name is a template such as "
            "\"bh_a{alpha}_k{max_k}\"")},
    }
    for method in ROUTERS:
        defs[method] = method_schema(method, grid=False)
        defs[f"{method}_grid"] = method_schema(method, grid=True)
    defs["null_model"] = {"type": "string", "enum": list(NULL_KINDS),
                          "description": "; ".join(f"{n} = {k.description}" for n, k in NULL_KINDS.items())}
    defs["calibrated_null"] = {"type": "string", "enum": list(calibrated_kinds()),
                               "description": "null kinds the calibrate_null job fits"}
    defs["experts_implementation"] = {"type": ["string", "null"], "enum": [None, *SUPPORTED_KERNELS],
                                      "description": "transformers experts kernel; null keeps the library default"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": defs}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # shared definitions are written out in full
        return True


def schema_text() -> str:
    return HEADER + yaml.dump(routing_schema(), Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True,
                              default_flow_style=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generated schema")
    parser.add_argument("--out", type=Path, default=SCHEMA_PATH, help="where the schema goes (default %(default)s)")
    args = parser.parse_args(argv)
    text = schema_text()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is not the schema the registered rules generate; run python -m routelab.schema",
                  file=sys.stderr)
            return 1
        return 0
    from routelab.io.files import write_text

    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
