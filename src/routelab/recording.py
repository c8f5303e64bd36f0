"""Record every routing decision: per (token, layer) rows to Parquet plus running summary counts.

Decisions are gathered on the model's device during the forward pass and copied to the host once per
batch. ``routing.parquet`` has one row per (token, MoE layer):

``window_id int32, doc_id int32, position int32, token_id int32, layer int16, k int16,
experts list<int16>, weights list<float32>`` (only the ``k`` selected experts, most preferred first).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .routers import Selection

SCHEMA = pa.schema([
    ("window_id", pa.int32()), ("doc_id", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("layer", pa.int16()), ("k", pa.int16()), ("experts", pa.list_(pa.int16())), ("weights", pa.list_(pa.float32())),
])


class RoutingRecorder:
    """Collects one run's routing decisions; pass it to :func:`routelab.patching.install_router`.

    Call :meth:`begin_batch` before each forward pass (it says which positions are real tokens) and
    :meth:`end_batch` after it; :meth:`close` finishes the Parquet file, :meth:`summary` reduces the
    running counts.
    """

    def __init__(self, num_layers: int, num_experts: int, min_k: int, max_k: int,
                 path: str | os.PathLike | None = None, row_group_size: int = 1 << 20):
        self.num_layers, self.num_experts, self.min_k, self.max_k = num_layers, num_experts, min_k, max_k
        self._writer = pq.ParquetWriter(str(path), SCHEMA, compression="zstd") if path is not None else None
        self._row_group_size = row_group_size
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._batch: dict[str, Any] | None = None
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._device: torch.device | None = None
        self._k_hist = self._expert_counts = self._p_moments = None

    def _init_counts(self, device: torch.device) -> None:
        self._device = device
        self._k_hist = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.long, device=device)
        self._expert_counts = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.long, device=device)
        # sum p, sum p^2, count, sum p over selected, count selected  (float64 for exact-ish sums)
        self._p_moments = torch.zeros(5, dtype=torch.float64, device=device)

    def begin_batch(self, attention_mask: torch.Tensor, window_ids: torch.Tensor, doc_ids: torch.Tensor,
                    input_ids: torch.Tensor) -> None:
        """``attention_mask`` / ``input_ids`` ``[batch, seq]``; ids ``[batch]``. Pads are not recorded."""
        valid = attention_mask.bool()
        rows, cols = valid.nonzero(as_tuple=True)
        self._batch = {
            "flat_valid": valid.reshape(-1),
            "window_id": window_ids.to(valid.device)[rows], "doc_id": doc_ids.to(valid.device)[rows],
            "position": cols, "token_id": input_ids[rows, cols],
        }
        self._layers = {}
        if self._k_hist is None:
            self._init_counts(valid.device)

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        """Called from the patched router for every layer of every forward pass."""
        if self._batch is None:
            return
        valid = self._batch["flat_valid"].to(selection.k.device)
        k, indices, weights = selection.k[valid], selection.indices[valid], selection.weights[valid]
        self._k_hist[layer] += torch.bincount(k, minlength=self.num_experts + 1).to(self._device)
        self._expert_counts[layer] += torch.bincount(indices.reshape(-1), minlength=self.num_experts + 1).to(self._device)
        if selection.pvalues is not None:
            p = selection.pvalues[valid].double()
            used = indices < self.num_experts
            chosen = p.gather(-1, indices.clamp(max=self.num_experts - 1))[used]
            self._p_moments += torch.stack([p.sum(), (p * p).sum(), torch.tensor(float(p.numel()), device=p.device,
                                            dtype=torch.float64), chosen.sum(),
                                            torch.tensor(float(chosen.numel()), device=p.device, dtype=torch.float64)]
                                           ).to(self._device)
        self._layers[layer] = (k, indices, weights.float())

    def end_batch(self) -> None:
        """Move this batch's decisions to the host in one copy per tensor and queue them for Parquet."""
        if self._batch is None or self._writer is None or not self._layers:
            self._batch = None
            return
        layers = sorted(self._layers)
        k = torch.stack([self._layers[i][0] for i in layers], dim=1).cpu().numpy()  # [T, L]
        idx = torch.stack([self._layers[i][1] for i in layers], dim=1).cpu().numpy()  # [T, L, max_k]
        w = torch.stack([self._layers[i][2] for i in layers], dim=1).cpu().numpy()
        tokens, n_layers = k.shape
        meta = {key: self._batch[key].cpu().numpy().astype(np.int32) for key in ("window_id", "doc_id", "position",
                                                                                 "token_id")}
        used = np.arange(idx.shape[-1]) < k[..., None]
        offsets = np.concatenate([[0], np.cumsum(k.reshape(-1))]).astype(np.int32)
        columns = {key: np.repeat(value, n_layers) for key, value in meta.items()}
        columns["layer"] = np.tile(np.asarray(layers, dtype=np.int16), tokens)
        columns["k"] = k.reshape(-1).astype(np.int16)
        columns["experts"] = pa.ListArray.from_arrays(offsets, idx[used].astype(np.int16))
        columns["weights"] = pa.ListArray.from_arrays(offsets, w[used].astype(np.float32))
        self._pending.append(pa.RecordBatch.from_pydict(columns, schema=SCHEMA))
        self._pending_rows += tokens * n_layers
        if self._pending_rows >= self._row_group_size:
            self._flush()
        self._batch = None

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, schema=SCHEMA),
                                     row_group_size=self._row_group_size)
            self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None

    def summary(self) -> dict[str, Any]:
        """Routing statistics of everything recorded so far (counts as ints, rates in %)."""
        if self._k_hist is None:
            raise RuntimeError("nothing was recorded")
        k_hist = self._k_hist.cpu().numpy()
        counts = self._expert_counts.cpu().numpy()[:, : self.num_experts]
        return routing_summary(k_hist, counts, self.min_k, self.max_k, self._p_moments.cpu().numpy())


def _k_stats(hist: np.ndarray, min_k: int, max_k: int) -> dict[str, float]:
    ks = np.arange(hist.size)
    total = hist.sum()
    mean = float((hist * ks).sum() / total)
    present = ks[hist > 0]
    cdf = np.cumsum(hist) / total
    return {
        "decisions": int(total),
        "experts_mean": mean,
        "experts_std": float(np.sqrt((hist * (ks - mean) ** 2).sum() / total)),
        "experts_median": float(ks[np.searchsorted(cdf, 0.5)]),
        "experts_min": int(present.min()),
        "experts_max": int(present.max()),
        "ceiling_hit_rate": float(100.0 * hist[max_k] / total),
        "floor_hit_rate": float(100.0 * hist[min_k] / total),
    }


def routing_summary(k_hist: np.ndarray, expert_counts: np.ndarray, min_k: int, max_k: int,
                    p_moments: np.ndarray | None = None) -> dict[str, Any]:
    """Reduce per-layer histograms of k ``[layers, E+1]`` and expert counts ``[layers, E]``."""
    overall = _k_stats(k_hist.sum(axis=0), min_k, max_k)
    summary: dict[str, Any] = {"total_decisions": overall.pop("decisions"), **overall,
                               "min_k": min_k, "max_k": max_k}
    if p_moments is not None and p_moments[2] > 0:
        mean = p_moments[0] / p_moments[2]
        summary["pvalue_mean"] = float(mean)
        summary["pvalue_std"] = float(np.sqrt(max(p_moments[1] / p_moments[2] - mean**2, 0.0)))
        summary["selected_pvalue_mean"] = float(p_moments[3] / max(p_moments[4], 1))
    else:
        summary["pvalue_mean"] = summary["pvalue_std"] = summary["selected_pvalue_mean"] = None
    summary["per_layer"] = [{"layer": i, **_k_stats(h, min_k, max_k)} for i, h in enumerate(k_hist)]
    summary["k_histogram"] = {str(k): int(c) for k, c in enumerate(k_hist.sum(axis=0)) if c}
    summary["expert_counts"] = expert_counts.astype(int).tolist()
    return summary
