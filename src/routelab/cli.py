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
