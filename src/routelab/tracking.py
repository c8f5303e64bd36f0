"""A small run logger: hyperparameters and per-step metrics as JSONL and CSV files on disk."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from .io import write_json


class RunLogger:
    """Append-only metric log for one run (training or routing).

    ``metrics.jsonl`` receives one JSON object per ``log`` call as it happens (so a crashed run
    still shows how far it got); ``close`` writes the same rows as ``metrics.csv``.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = ""):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.rows: list[dict[str, Any]] = []
        self._jsonl = open(self.directory / f"{prefix}metrics.jsonl", "w")

    def log_params(self, params: dict[str, Any]) -> None:
        write_json(self.directory / f"{self.prefix}hparams.json", params)

    def log(self, step: int, **metrics: float) -> None:
        row = {"step": step, **metrics}
        self.rows.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self.rows:
            fields = list(dict.fromkeys(k for row in self.rows for k in row))
            with open(self.directory / f"{self.prefix}metrics.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
