"""Shared plumbing of the stage scripts: logging into the rule's log, JSON arguments, error exit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError)  # a KeyError is a bug: keep its traceback


def setup_logging() -> None:
    """Log to stderr (the rules redirect it into the job's log file)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def json_arg(text: str) -> Any:
    """argparse type: a JSON literal, or ``@file.json``."""
    try:
        if text.startswith("@"):
            return json.loads(Path(text[1:]).read_text())
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text[:80]!r}") from None


def device_map_arg(text: str) -> Any:
    """argparse type: a device-map strategy (``auto``, ``balanced``, ...) or a JSON ``{module: device}``."""
    return json_arg(text) if text.lstrip().startswith(("{", "@")) else text


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The loading options of every script that runs the model (the config's ``model`` section)."""
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--experts-implementation", default=None)
    parser.add_argument("--device-map", type=device_map_arg, default=None,
                        help="spread the model with accelerate: auto, balanced, sequential or a JSON {module: device}")
    parser.add_argument("--max-memory", type=json_arg, default=None,
                        help='with --device-map: JSON {device: size}, e.g. {"0": "70GiB", "cpu": "200GiB"}')
    parser.add_argument("--offload-folder", default=None, help="with --device-map: where 'disk' modules live")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs this job takes (several: with --device-map)")


def layer_option(text: str) -> int | None:
    """argparse type: a layer index, or None from the config's null (Snakemake writes it as "None")."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer must be a layer index or None, got {text!r}") from None


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse arguments and run ``main``; a user error ends with one clear line and exit status 2."""
    args = parser.parse_args()
    setup_logging()
    try:
        main(args)
    except USER_ERRORS as exc:
        logging.getLogger(parser.prog).error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
