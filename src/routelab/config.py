"""Experiment configuration: schema validation, semantic checks and routing-grid expansion.

The same functions run inside the Snakefile (through ``snakemake.utils.validate``) and in scripts or
notebooks (``load_config``), so a bad config fails the same way everywhere: one message naming the
key, the value and what would be valid.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from routelab import download
from routelab.choices import calibration_needed, choose_alternative

DEMO_MODEL_ID = "demo"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# Where the schemas live in a source checkout (the package is installed editable from it).
SCHEMAS = Path(__file__).resolve().parents[2] / "workflow" / "schemas"
DEFAULT_SCHEMA = SCHEMAS / "config.schema.yaml"
# Generated from the routing rules (routelab.schema): read here so that the Snakefile needs no torch.
ROUTING_SCHEMA = SCHEMAS / "routing.schema.yaml"


@functools.cache
def _routing_defs() -> dict[str, Any]:
    with open(ROUTING_SCHEMA) as fh:
        return yaml.safe_load(fh)["$defs"]


def routing_methods() -> tuple[str, ...]:
    """The registered routing rules' method names."""
    return tuple(_routing_defs()["routing"]["properties"]["method"]["enum"])


def method_defaults(method: str) -> dict[str, Any]:
    """``{parameter: default}`` of one rule, in its declared order; None for k / max_k means the model's top-k."""
    properties = _routing_defs()[method]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if key not in ("name", "method")}


def method_schema(method: str) -> dict[str, Any]:
    """One rule's generated schema entry (``properties`` and the ``x-`` annotations of routelab.schema)."""
    return _routing_defs()[method]


def list_parameters(method: str) -> tuple[str, ...]:
    """The parameters of ``method`` whose value is a list (a grid sweeps them with a list of lists)."""
    properties = method_schema(method)["properties"]
    return tuple(key for key, spec in properties.items() if "array" in (spec.get("type") or []))


def uses_calibration(spec: dict[str, Any]) -> bool:
    """Whether a normalised routing config fits its rule to the calibration split's router logits (the
    route job then reads them; :meth:`routelab.routing.contract.Router.uses_calibration` in the library)."""
    schema = method_schema(spec["method"])
    groups = [(group["keys"], group["default"]) for group in schema.get("x-alternatives", [])]
    return calibration_needed(spec, schema.get("x-calibrated", []), groups)


def expert_count_parameters(method: str) -> tuple[str, ...]:
    """The parameters of ``method`` that count experts per token (each at most the model's experts)."""
    return tuple(method_schema(method).get("x-expert-counts", ()))


def teacher_forced(method: str) -> bool:
    """Whether the rule looks at every token of a window at once (it cannot route generation)."""
    return bool(method_schema(method).get("x-teacher-forced", False))


def routing_parameters() -> tuple[str, ...]:
    """Every rule's parameter names, each once, in registry order."""
    return tuple(dict.fromkeys(key for method in routing_methods() for key in method_defaults(method)))


def calibrated_nulls() -> tuple[str, ...]:
    """The null kinds the calibrate_null job fits (the others need no calibration)."""
    return tuple(_routing_defs()["calibrated_null"]["enum"])


class ConfigError(ValueError):
    """A user-fixable problem in the experiment configuration."""


def key_path(parts: Any) -> str:
    """Render a jsonschema path (``deque(['routing', 1, 'alpha'])``) as ``routing[1].alpha``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<config root>"


def describe_schema_error(error: Any) -> str:
    """One line for a ``jsonschema.ValidationError``: the key, the bad value and what is valid."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        # The alternative that got furthest into the value (e.g. into a list's bad item) explains it best.
        # On a tie, a type mismatch ("not a number") explains less than the matching branch's own error.
        error = max(error.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
    where = key_path(error.absolute_path)
    value, rule, schema = error.instance, error.validator_value, error.schema
    hint = f" ({schema['description'].strip()})" if isinstance(schema, dict) and schema.get("description") else ""
    if error.validator == "enum":
        valid = ", ".join(json.dumps(v) for v in rule)
        return f"{where}: {value!r} is not valid; choose one of {valid}{hint}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{where}: {value!r} is out of range; valid: {_range_text(schema)}{hint}"
    if error.validator == "required":
        missing = [k for k in rule if k not in value]
        return f"{where}: missing required key {missing[0]!r}{hint}"
    if error.validator == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed))
        method = schema.get("properties", {}).get("method", {}).get("const")
        if method is not None:  # one routing rule's entry (routing.schema.yaml): name the rule's parameters
            valid = [key for key in allowed if key not in ("name", "method")]
            return (f"{where}.{extra[0]}: {value[extra[0]]!r} given, but {extra[0]!r} is not a parameter of method "
                    f"{method!r}; valid: {', '.join(valid)}")
        return f"{where}: unknown key {extra[0]!r}; valid keys: {', '.join(sorted(allowed))}"
    if error.validator == "type":
        return f"{where}: {value!r} has the wrong type; expected {rule}{hint}"
    if error.validator == "pattern":
        return f"{where}: {value!r} is not a valid name; use letters, digits and _ . + - only"
    if error.validator in ("minItems", "minProperties", "minLength"):
        return f"{where}: {value!r} must not be empty{hint}"
    return f"{where}: {error.message}{hint}"


def _range_text(schema: dict) -> str:
    low = (f"> {schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema
           else f">= {schema['minimum']}" if "minimum" in schema else "")
    high = (f"< {schema['exclusiveMaximum']}" if "exclusiveMaximum" in schema
            else f"<= {schema['maximum']}" if "maximum" in schema else "")
    return " and ".join(t for t in (low, high) if t)


@functools.cache
def _schema_validator(schema: Path):
    """A JSON-schema validator for ``schema`` that fills defaults in place, the schema and the files its
    ``$ref``s name parsed once (with libyaml where present): ``snakemake.utils.validate`` re-parses a
    referenced file for every reference it resolves, seconds per config with the routing schema."""
    from jsonschema import Draft202012Validator, validators
    from referencing import Registry, Resource

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    resources = {path.resolve().as_uri(): Resource.from_contents(yaml.load(path.read_text(), Loader=loader))
                 for path in sorted(schema.parent.glob("*.schema.yaml"))}
    registry = Registry().with_resources(resources.items())
    root = resources[schema.as_uri()].contents
    check_properties = Draft202012Validator.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, subschema):
        # as snakemake.utils.validate does (the jsonschema FAQ's recipe): a default is set before checking
        if isinstance(instance, dict):
            for name, spec in properties.items():
                if "default" in spec:
                    instance.setdefault(name, spec["default"])
        yield from check_properties(validator, properties, instance, subschema)

    filling = validators.extend(Draft202012Validator, {"properties": properties_with_defaults})
    return filling({**root, "$id": schema.as_uri()}, registry=registry)


def validate_schema(config: dict, schema: str | os.PathLike = DEFAULT_SCHEMA) -> dict:
    """Validate against the JSON schema, filling defaults in place (the semantics of
    ``snakemake.utils.validate``); the first error as a one-line :class:`ConfigError`."""
    import jsonschema

    try:
        _schema_validator(Path(schema).resolve()).validate(config)
    except jsonschema.ValidationError as exc:
        raise ConfigError(f"invalid config: {describe_schema_error(exc)}") from None
    return config


def expand_grid(entry: dict, where: str) -> list[dict]:
    """Expand one ``routing_grid`` entry into named routing configs (cartesian product of list values)."""
    lists = list_parameters(entry["method"]) if entry.get("method") in routing_methods() else ()

    def sweep(key: str, value: Any) -> list:
        if key in lists:  # a list-valued parameter: a sweep is a list of lists
            return value if isinstance(value, list) and value and all(isinstance(v, list) for v in value) else [value]
        return value if isinstance(value, list) else [value]

    swept = {k: sweep(k, v) for k, v in entry.items() if k not in ("name", "method")}
    keys = list(swept)
    runs = []
    for values in itertools.product(*(swept[k] for k in keys)):
        params = dict(zip(keys, values))
        try:
            # A list value reads as its items joined by "-" in a name ("ks{ks}" -> "ks1-2-4-8").
            name = entry["name"].format(**{key: "-".join(map(str, value)) if isinstance(value, list) else value
                                           for key, value in params.items()})
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"{where}.name: template {entry['name']!r} refers to {exc}; it may use only "
                f"{', '.join('{' + k + '}' for k in keys)}"
            ) from None
        runs.append({"name": name, "method": entry["method"], **params})
    return runs


def routing_configs(config: dict) -> dict[str, dict]:
    """All routing configs by name: the explicit list first, then the expanded grid, defaults filled."""
    entries = [(f"routing[{i}]", dict(r)) for i, r in enumerate(config.get("routing", []))]
    for i, grid in enumerate(config.get("routing_grid", [])):
        entries += [(f"routing_grid[{i}]", run) for run in expand_grid(grid, f"routing_grid[{i}]")]
    runs: dict[str, dict] = {}
    for where, run in entries:
        name = run["name"]
        if not NAME_PATTERN.match(name):
            raise ConfigError(f"{where}.name: {name!r} is not a valid name; use letters, digits and _ . + - only")
        if name in runs:
            raise ConfigError(f"{where}.name: {name!r} is used twice; routing config names must be unique")
        runs[name] = normalise_routing(run, where)
    if not runs:
        raise ConfigError("routing: no routing configs; give at least one under routing or routing_grid")
    return runs


def normalise_routing(run: dict, where: str = "routing") -> dict:
    """One routing config with its rule's defaults filled in (``name``, ``method``, then the rule's parameters
    in declared order), after the checks the schema cannot make: the rule exists, no other rule's
    parameter is given, ``min_k <= max_k``, ``skip_top < k``. Value types and ranges are the schema's
    (routing.schema.yaml)."""
    method = run["method"]
    if method not in routing_methods():
        raise ConfigError(f"{where}.method: {method!r} is not valid; choose one of {', '.join(routing_methods())}")
    defaults = method_defaults(method)
    for key in run:
        if key not in ("name", "method") and key not in defaults:
            raise ConfigError(
                f"{where}.{key}: {run[key]!r} given, but {key!r} is not a parameter of method {method!r}; "
                f"valid: {', '.join(defaults)}"
            )
    spec = {"name": run["name"], "method": method, **{key: run.get(key, value) for key, value in defaults.items()}}
    for group in method_schema(method).get("x-alternatives", []):
        try:
            spec = choose_alternative(spec, group["keys"], group["default"])
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if "min_k" in spec and spec.get("max_k") is not None and spec["min_k"] > spec["max_k"]:
        raise ConfigError(
            f"{where}.min_k: {spec['min_k']} is greater than max_k = {spec['max_k']}; need 1 <= min_k <= max_k"
        )
    if spec.get("skip_top") and spec.get("k") is not None and spec["skip_top"] >= spec["k"]:
        raise ConfigError(f"{where}.skip_top: {spec['skip_top']} leaves no expert of k = {spec['k']}; "
                          "need 0 <= skip_top < k")
    return spec


TEXT_TASKS = ("perplexity", "cloze")
LM_EVAL_KEYS = ("include_path", "num_fewshot", "limit", "fewshot_seed", "options", "generates")


def check_task_keys(ds: dict, where: str, base_dir: str | os.PathLike = ".") -> None:
    """A text dataset's ``task`` is one routelab scores; the lm-eval keys belong to ``source: lm_eval`` alone,
    and an lm-eval task runs in one job (no shards)."""
    source = ds["source"]
    if source != "lm_eval":
        if ds.get("task", "perplexity") not in TEXT_TASKS:
            raise ConfigError(f"{where}.task: {ds['task']!r} is not valid for source {source!r}; choose one of "
                              f"{', '.join(TEXT_TASKS)} (an lm-eval task needs source: lm_eval)")
        defaults = dataset_defaults()
        given = [key for key in LM_EVAL_KEYS if key in ds and ds[key] != defaults[key]]
        if given:
            raise ConfigError(f"{where}.{given[0]}: only lm-eval tasks (source: lm_eval) take it "
                              f"(source is {source!r})")
        return
    if ds.get("task", "perplexity") in TEXT_TASKS:
        raise ConfigError(f"{where}.task: {ds.get('task', 'perplexity')!r} is routelab's own; give the lm-eval task "
                          "or group to run (e.g. arc_easy)")
    if ds.get("shards", 1) > 1:
        raise ConfigError(f"{where}.shards: {ds['shards']} is not valid for an lm-eval task; it runs in one job (1)")
    include = ds.get("include_path")
    if include is not None and not (Path(base_dir) / include).is_dir():
        raise ConfigError(f"{where}.include_path: {include!r} is not a folder (of lm-eval task YAMLs; looked in "
                          f"{Path(base_dir).resolve()})")


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs for their plain keys: tags such as ``!function`` load as None."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_yaml(ds: dict, base_dir: str | os.PathLike = ".") -> dict | None:
    """The task YAML of an lm-eval dataset's task in its ``include_path`` (keys of ``include:`` files
    below its own), None when the task is not there (one of lm-eval's own)."""
    if ds["source"] != "lm_eval" or ds.get("include_path") is None:
        return None
    for path in sorted((Path(base_dir) / ds["include_path"]).rglob("*.yaml")):
        task = yaml.load(path.read_text(), Loader=_TaskYamlLoader) or {}
        if isinstance(task, dict) and task.get("task") == ds["task"]:
            while task.get("include"):
                path = path.parent / task.pop("include")
                task = {**(yaml.load(path.read_text(), Loader=_TaskYamlLoader) or {}), **task}
            return task
    return None


def task_generates(ds: dict, base_dir: str | os.PathLike = ".") -> bool:
    """Whether an lm-eval dataset's task generates text (``output_type: generate_until``), so that a
    teacher-forced routing rule cannot run it: the entry's ``generates`` when given, else the output type of
    its task YAML in ``include_path``, else False (lm-eval's own tasks: the route job finds out and refuses
    such a pair, naming ``generates``)."""
    if ds.get("generates") is not None:
        return bool(ds["generates"])
    task = task_yaml(ds, base_dir)
    return task is not None and task.get("output_type") == "generate_until"


# datasets builders that read local files (an lm-eval task YAML's dataset_path)
LOCAL_DATASET_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def task_data_is_local(ds: dict, base_dir: str | os.PathLike = ".") -> bool:
    """Whether an lm-eval task builds its documents without the hub (``custom_dataset``, as the demo's, or a
    local file builder), so ``snakemake download`` has nothing to fetch for it."""
    task = task_yaml(ds, base_dir)
    return task is not None and ("custom_dataset" in task or task.get("dataset_path") in LOCAL_DATASET_BUILDERS)


def routed_datasets(config: dict, runs: dict[str, dict], base_dir: str | os.PathLike = ".") -> dict[str, list[str]]:
    """``{routing: the datasets it runs on}``: every dataset, but a teacher-forced rule skips the lm-eval
    tasks that generate (it cannot route a decode step)."""
    generating = {name for name, ds in config["datasets"].items() if task_generates(ds, base_dir)}
    return {name: [d for d in config["datasets"] if not (teacher_forced(spec["method"]) and d in generating)]
            for name, spec in runs.items()}


def check_datasets(config: dict, base_dir: str | os.PathLike = ".") -> None:
    """Source-specific checks the schema cannot express (required keys per source, files exist)."""
    for name, ds in config["datasets"].items():
        where = f"datasets.{name}"
        source = ds["source"]
        if source == "demo" and "domain" not in ds:
            raise ConfigError(f"{where}.domain: missing; a demo dataset needs one of arithmetic, grammar, code, cloze")
        if source == "hub" and not ds.get("path"):
            raise ConfigError(f"{where}.path: missing; a hub dataset needs its dataset id, e.g. 'wikitext'")
        if source == "local":
            if not ds.get("files"):
                raise ConfigError(f"{where}.files: missing; a local dataset needs a list of text/json/parquet files")
            for i, file in enumerate(ds["files"]):
                if not (Path(base_dir) / file).is_file():
                    raise ConfigError(f"{where}.files[{i}]: {file!r} does not exist "
                                      f"(looked in {Path(base_dir).resolve()})")
        if source != "demo" and "domain" in ds:
            raise ConfigError(f"{where}.domain: only demo datasets have a domain (source is {source!r})")
        check_task_keys(ds, where, base_dir)
        documents = ds.get("documents", 100)
        if ds.get("shards", 1) > documents:
            raise ConfigError(f"{where}.shards: {ds['shards']} exceeds documents = {documents}; a shard holds "
                              "whole documents, so need 1 <= shards <= documents")


# Where transformers MoE configs keep the expert count and the top-k (text_config too, for multimodal models).
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k")


def _first_int(fields: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = fields.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_size(config: dict, base_dir: str | os.PathLike = ".") -> tuple[int, int | None, str] | None:
    """``(experts, top_k, where read)`` of the configured model when it is knowable before any job: the demo's
    from ``demo_model``, a local or already downloaded model's from its ``config.json``; else None."""
    model_id = config["model"]["id"]
    if model_id == DEMO_MODEL_ID:
        return config["demo_model"]["experts"], config["demo_model"]["top_k"], "demo_model.experts"
    local = Path(base_dir) / model_id
    try:
        path = (local if local.is_dir() else Path(base_dir) / download.model_dir(model_id)) / "config.json"
        fields = json.loads(path.read_text())
    except (ValueError, OSError):  # not downloaded yet, or not a valid hub id (the download rule says so)
        return None
    for part in (fields, fields.get("text_config") or {}):
        experts = _first_int(part, EXPERT_COUNT_FIELDS)
        if experts is not None:
            groups, kept = _first_int(part, ("n_group",)), _first_int(part, ("topk_group",))
            if groups and kept and kept < groups and _group_limited(part):
                # DeepSeek-V3 class: a token chooses among the experts of its best topk_group groups only.
                return (experts // groups * kept, _first_int(part, TOP_K_FIELDS),
                        f"{path}: {experts} experts in {groups} groups, each token choosing within its best {kept}")
            return experts, _first_int(part, TOP_K_FIELDS), f"{path}"
    return None


def _group_limited(fields: dict[str, Any]) -> bool:
    """Whether a config.json's router limits each token to its best expert groups (DeepSeek-V2 only when
    its ``topk_method`` says so)."""
    return fields.get("model_type") != "deepseek_v2" or fields.get("topk_method") == "group_limited_greedy"


def check_expert_counts(runs: dict[str, dict], experts: int, top_k: int | None, source: str) -> None:
    """Every parameter that counts experts per token against the model's ``experts`` (read from
    ``source``), and min_k against max_k (the model's ``top_k`` where max_k is null)."""
    for name, spec in runs.items():
        for key in expert_count_parameters(spec["method"]):
            value = spec.get(key)
            items = value if isinstance(value, list) else [value]
            too_many = [item for item in items if item is not None and item > experts]
            if too_many:
                need = f"each value <= {experts}" if isinstance(value, list) else f"{key} <= {experts}"
                raise ConfigError(f"routing {name}.{key}: {value!r} exceeds the {experts} experts a token may "
                                  f"choose from ({source}); need {need}")
        min_k, max_k = spec.get("min_k"), spec.get("max_k")
        if "max_k" in spec and max_k is None:
            max_k = top_k
        if min_k is not None and max_k is not None and min_k > max_k:
            which = f"max_k = {spec['max_k']}" if spec.get("max_k") is not None else f"the model's top-k {top_k}"
            raise ConfigError(f"routing {name}.min_k: {min_k} is greater than {which}; need min_k <= max_k")


def check_model_placement(model: dict) -> None:
    """``max_memory`` and ``offload_folder`` only mean something for a model spread by ``device_map``."""
    for key in ("max_memory", "offload_folder"):
        if model.get(key) is not None and model.get("device_map") is None:
            raise ConfigError(f"model.{key}: {model[key]!r} given without model.device_map; it only applies to a "
                              "model spread by accelerate (set model.device_map: auto or a map)")


def check_config(config: dict, base_dir: str | os.PathLike = ".") -> dict[str, dict]:
    """Semantic checks after schema validation; returns the expanded routing configs by name."""
    check_model_placement(config["model"])
    check_datasets(config, base_dir)
    runs = routing_configs(config)
    size = model_size(config, base_dir)
    if size is not None:
        check_expert_counts(runs, *size)
    baseline = config.get("report", {}).get("baseline")
    if baseline is not None and baseline not in runs:
        raise ConfigError(f"report.baseline: {baseline!r} is not a routing config; valid: {', '.join(runs)}")
    if config["model"]["id"] == DEMO_MODEL_ID:
        demo = config["demo_model"]
        if demo["top_k"] > demo["experts"]:
            raise ConfigError(f"demo_model.top_k: {demo['top_k']} exceeds demo_model.experts = {demo['experts']}")
        layer = config.get("report", {}).get("layer")
        if layer is not None and layer >= demo["layers"]:
            raise ConfigError(f"report.layer: {layer} does not exist; the demo model has layers "
                              f"0..{demo['layers'] - 1} (demo_model.layers = {demo['layers']})")
        for name, spec in runs.items():
            ks = spec.get("ks") if spec["method"] == "layerk" else None
            if ks is not None and len(ks) != demo["layers"]:
                raise ConfigError(f"routing {name}.ks: {ks!r} has {len(ks)} values but the demo model has "
                                  f"{demo['layers']} MoE layers (demo_model.layers); need one k per layer")
        if demo["hidden_size"] % demo["heads"]:
            raise ConfigError(
                f"demo_model.heads: {demo['heads']} does not divide hidden_size = {demo['hidden_size']}"
            )
    return runs


def load_config(path: str | os.PathLike, schema: str | os.PathLike = DEFAULT_SCHEMA,
                base_dir: str | os.PathLike = ".") -> dict:
    """Read, validate (defaults filled) and check a config file, as the Snakefile does."""
    with open(path) as fh:
        config = yaml.safe_load(fh) or {}
    validate_schema(config, schema)
    check_config(config, base_dir)
    return config


def baseline_name(config: dict) -> str:
    """The routing config the report compares against: ``report.baseline`` or the first top-k config
    (not an ablation that skips the best experts)."""
    runs = routing_configs(config)
    chosen = config.get("report", {}).get("baseline")
    if chosen:
        return chosen
    return next((name for name, spec in runs.items() if spec["method"] == "topk" and not spec.get("skip_top")),
                next(iter(runs)))


def section_defaults(section: str, schema: str | os.PathLike = DEFAULT_SCHEMA) -> dict[str, Any]:
    """Default values of one top-level config section, read from the schema (for the stage scripts)."""
    with open(schema) as fh:
        properties = yaml.safe_load(fh)["properties"][section]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def dataset_defaults(schema: str | os.PathLike = DEFAULT_SCHEMA) -> dict[str, Any]:
    """Default values of a ``datasets`` entry's keys, read from the schema."""
    with open(schema) as fh:
        properties = yaml.safe_load(fh)["properties"]["datasets"]["additionalProperties"]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}
