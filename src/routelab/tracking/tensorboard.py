"""TensorBoard: a run's tracking files as event files (scalars, histograms, text)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from routelab.tracking.export import require


def _bin_stats(edges: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Count, sum and sum of squares of a histogram, every value taken at its bin centre."""
    centres = (edges[:-1] + edges[1:]) / 2
    used = np.nonzero(counts)[0]
    return {"min": float(centres[used[0]]) if used.size else 0.0,
            "max": float(centres[used[-1]]) if used.size else 0.0,
            "num": float(counts.sum()), "sum": float((counts * centres).sum()),
            "sum_squares": float((counts * centres**2).sum())}


class TensorBoardExporter:
    """Scalars, histograms and text into TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str | os.PathLike):
        board = require("torch.utils.tensorboard", "tracking.tensorboard", package="tensorboard")
        self.log_dir = Path(log_dir)
        self._writer = board.SummaryWriter(log_dir=str(log_dir))

    def params(self, params: dict[str, Any]) -> None:
        self._writer.add_text("hparams", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(name, value, global_step=step)

    def final(self, values: dict[str, Any], step: int = 0) -> None:
        self.scalars(step, {f"final/{name}": value for name, value in values.items()})

    def histogram(self, name: str, step: int, edges: np.ndarray, counts: np.ndarray) -> None:
        stats = _bin_stats(edges, counts)
        # bucket_limits are right edges; the first bucket starts at the first edge.
        self._writer.add_histogram_raw(name, stats["min"], stats["max"], stats["num"], stats["sum"],
                                       stats["sum_squares"], bucket_limits=edges[1:].tolist(),
                                       bucket_counts=counts.tolist(), global_step=step)

    def artifact(self, name: str, path: str) -> None:
        self._writer.add_text(f"artifacts/{name}", path)

    def close(self) -> None:
        self._writer.close()
